"""The frontend language: LM programs in plain Python over any stage (SGLang's ``sgl.function``).

    import lang as sgl

    @sgl.function
    def pick(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.select("answer", choices=["yes", "no"]))

    sgl.set_default_backend(Engine())  # any stage's Engine, or a server:
    # sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))
    print(pick.run(question="Is the sea salty?")["answer"])

A program adds pieces to its state: text, roles (``system``, ``user``,
``assistant``, through the model's chat template), ``gen`` and ``select``; it
branches with ``s.fork(n)``. The runtime does its part: a fork's branches
share their text through the prefix cache and generate as one batch, a
select scores all its choices in one batch, and ``run_batch`` keeps many
programs' requests in the same steps.
"""

from .backend import EngineBackend
from .primitives import assistant, gen, select, system, user
from .program import Program, function, set_default_backend
from .runtime_endpoint import RuntimeEndpoint
from .state import ForkGroup, ProgramState

__all__ = ["EngineBackend", "ForkGroup", "Program", "ProgramState", "RuntimeEndpoint", "assistant", "function", "gen",
           "select", "set_default_backend", "system", "user"]
