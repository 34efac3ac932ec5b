"""A program: a Python function whose first argument is the state, run on a backend.

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    state = qa.run(question="Why is the sky blue?")
    states = qa.run_batch([{"question": q} for q in questions], num_threads=8)

``run_batch`` runs programs in threads, so their requests meet in the
engine's steps (continuous batching): many programs cost about as many
steps as the longest of them.
"""

import concurrent.futures
import threading

from .backend import EngineBackend
from .state import ProgramState

_default_backend = None


def set_default_backend(backend) -> None:
    """The backend programs run on unless ``run`` is given one: an ``EngineBackend`` or any stage's
    ``Engine`` (wrapped in one)."""
    global _default_backend
    _default_backend = as_backend(backend)


def as_backend(backend):
    if backend is None:
        if _default_backend is None:
            raise ValueError("no backend: call set_default_backend(engine) or pass backend= to run()")
        return _default_backend
    if isinstance(backend, EngineBackend) or hasattr(backend, "generate") and hasattr(backend, "score"):
        return backend
    if hasattr(backend, "generate_batch") and hasattr(backend, "tokenizer"):
        return EngineBackend(backend)
    raise TypeError(f"{type(backend).__name__} is not a backend: pass a stage's Engine or an EngineBackend")


class Program:
    """A decorated function; ``run`` and ``run_batch`` execute it."""

    def __init__(self, func):
        self.func = func
        self.__name__, self.__doc__ = func.__name__, func.__doc__

    def run(self, *args, backend=None, stream: bool = False, **kwargs) -> ProgramState:
        """Run once; the finished state. With ``stream``, the state comes back at once and the program
        runs in a thread: read ``state.text_iter()``."""
        state = ProgramState(as_backend(backend), stream=stream)
        if not stream:
            self.func(state, *args, **kwargs)
            return state

        def body():
            try:
                self.func(state, *args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - text_iter raises it in the reader
                state.error = error
            finally:
                state._close()

        threading.Thread(target=body, daemon=True, name=f"program-{self.__name__}").start()
        return state

    def run_batch(self, batch_kwargs: list[dict], backend=None, num_threads: int | str = "auto") -> list[ProgramState]:
        """Run once per keyword dict, ``num_threads`` programs at a time ("auto": all of them, up to 64)."""
        backend = as_backend(backend)
        threads = min(len(batch_kwargs), 64) if num_threads == "auto" else num_threads
        with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
            return list(pool.map(lambda kwargs: self.run(backend=backend, **kwargs), batch_kwargs))

    def __call__(self, *args, **kwargs):
        raise TypeError(f"a program runs with {self.__name__}.run(...) or .run_batch([...])")


def function(func) -> Program:
    """Make ``func(s, ...)`` an LM program (SGLang's ``@sgl.function``)."""
    return Program(func)
