"""A program's state: the text so far (or the chat so far), its variables, and the interpreter.

``s += piece`` runs the piece at once: text is appended; ``gen`` asks the
backend to continue the text and appends what it wrote; ``select`` scores its
choices and appends the best; a role (``user(...)``) runs its pieces inside
one chat message. Once a program uses roles, its text is the model's chat
template over its messages, and ``gen`` may run only in an assistant message
(the template's generation prompt is where the model speaks).

``s.fork(n)`` copies the state n times; ``forks += piece`` runs the piece on
every copy at once, so a ``gen`` of n forks is one batch of n requests whose
shared text the engine computes once (its prefix cache). The forks are states
of their own: ``forks[i]["name"]``.
"""

import copy
import queue

from .primitives import Gen, Role, Select

DONE = object()  # what a streamed state's queue ends with


class ProgramState:
    """What a program has said and generated so far."""

    def __init__(self, backend, stream: bool = False):
        self.backend = backend
        self.variables: dict[str, str] = {}
        self.meta: dict[str, dict] = {}  # name -> the meta info of the gen or select that set it
        self._text = ""  # a program without roles
        self._messages: list[dict] = []  # a program with roles: the messages, the last one perhaps open
        self._open: str | None = None  # the role being said now
        self._pieces: queue.Queue | None = queue.Queue() if stream else None
        self.error: BaseException | None = None

    # ----- what a program writes -------------------------------------------------------------

    def __iadd__(self, piece):
        run([self], piece)
        return self

    def fork(self, n: int) -> "ForkGroup":
        """``n`` copies of this state, to be continued apart (and batched: ``forks += gen(...)``)."""
        if n < 1:
            raise ValueError(f"fork({n}): a fork needs at least one branch")
        return ForkGroup([self._copy() for _ in range(n)])

    # ----- what a caller reads -----------------------------------------------------------------

    def __getitem__(self, name: str) -> str:
        if name not in self.variables:
            known = ", ".join(sorted(self.variables)) or "none"
            raise KeyError(f"no variable {name!r} in this program's state (it has: {known})")
        return self.variables[name]

    def get_meta_info(self, name: str) -> dict:
        self[name]  # the same error for an unknown name
        return self.meta[name]

    def text(self) -> str:
        """The text so far, as the model reads it (with roles: the chat template over the messages)."""
        if not self._messages:
            return self._text
        return self.backend.render(self._messages, add_generation_prompt=False)

    def messages(self) -> list[dict]:
        return copy.deepcopy(self._messages)

    def text_iter(self):
        """The text as the program writes it, piece by piece (``run(..., stream=True)``)."""
        if self._pieces is None:
            raise ValueError("text_iter() needs a state run with stream=True")
        while (piece := self._pieces.get()) is not DONE:
            yield piece
        if self.error is not None:
            raise self.error

    # ----- inside --------------------------------------------------------------------------------

    def _append(self, text: str) -> None:
        if self._open is not None:
            self._messages[-1]["content"] += text
        elif self._messages:
            raise ValueError(f"text {text[:40]!r} outside a role in a program that uses roles: put it in "
                             f"system(...), user(...) or assistant(...)")
        else:
            self._text += text
        if self._pieces is not None:
            self._pieces.put(text)

    def _prompt(self, what: str) -> str:
        """The text a generation continues: without roles, the text so far; in an assistant message,
        the chat template up to the model's turn plus what the message holds already."""
        if not self._messages:
            return self._text
        if self._open != "assistant":
            raise ValueError(f"{what} in a {self._open or 'no'} message: with roles, the model speaks in "
                             f"assistant(...) only")
        return self.backend.render(self._messages[:-1], add_generation_prompt=True) + self._messages[-1]["content"]

    def _copy(self) -> "ProgramState":
        twin = ProgramState(self.backend)
        twin.variables, twin.meta = dict(self.variables), copy.deepcopy(self.meta)
        twin._text, twin._messages, twin._open = self._text, copy.deepcopy(self._messages), self._open
        return twin

    def _close(self) -> None:
        if self._pieces is not None:
            self._pieces.put(DONE)


class ForkGroup(list):
    """The branches of ``fork(n)``: ``forks += piece`` runs it on all of them together."""

    def __iadd__(self, piece):
        run(list(self), piece)
        return self

    def join(self) -> list[ProgramState]:
        """The branches, each finished (they run as they are written: nothing is left to wait for)."""
        return list(self)


def run(states: list[ProgramState], piece) -> None:
    """Run ``piece`` on every state of ``states`` (one, or a fork's branches, batched)."""
    if isinstance(piece, str):
        for state in states:
            state._append(piece)
    elif isinstance(piece, (list, tuple)):
        for part in piece:
            run(states, part)
    elif isinstance(piece, Role):
        for state in states:
            if state._open is not None:
                raise ValueError(f"{piece.role}(...) inside {state._open}(...): roles do not nest")
            if not state._messages and state._text:
                raise ValueError("a role after plain text: a program uses roles from its start, or not at all")
            state._messages.append({"role": piece.role, "content": ""})
            state._open = piece.role
        try:
            run(states, piece.pieces)
        finally:
            for state in states:
                state._open = None
    elif isinstance(piece, Gen):
        _gen(states, piece)
    elif isinstance(piece, Select):
        for state in states:  # each state's choices are one batch
            _select(state, piece)
    else:
        raise TypeError(f"a program adds text, a role, gen() or select(), not {type(piece).__name__}")


def _gen(states: list[ProgramState], piece: Gen) -> None:
    prompts = [state._prompt(f"gen({piece.name!r})") for state in states]
    backend = states[0].backend
    if len(states) == 1 and states[0]._pieces is not None:  # streamed: piece by piece
        text = ""
        for text_piece in backend.stream(prompts[0], piece.sampling):
            states[0]._append(text_piece)
            text += text_piece
        outputs = [None]
    else:
        outputs = backend.generate(prompts, piece.sampling)
        for state, out in zip(states, outputs):
            state._append(out.text)
    for state, out in zip(states, outputs):
        if piece.name is not None:
            state.variables[piece.name] = text if out is None else out.text
            state.meta[piece.name] = {} if out is None else out.meta_info


def _select(state: ProgramState, piece: Select) -> None:
    prompt = state._prompt(f"select({piece.name!r})")
    scores, outputs = state.backend.score(prompt, piece.choices)
    mean = [sum(s) / len(s) for s in scores]
    if piece.choices_method == "greedy_token_selection":  # the first token decides; ties by the mean
        keys = [(s[0], m) for s, m in zip(scores, mean)]
    elif piece.choices_method == "unconditional_likelihood_normalized":
        alone, _ = state.backend.score("", piece.choices)
        keys = [m - (sum(a) / len(a) if a else 0.0) for m, a in zip(mean, alone)]
    else:
        keys = mean
    best = max(range(len(piece.choices)), key=lambda i: keys[i])
    state._append(piece.choices[best])
    if piece.name is not None:
        state.variables[piece.name] = piece.choices[best]
        # Token counts over the choices' requests (one each, in one batch), as a gen's meta info has them.
        state.meta[piece.name] = dict(normalized_prompt_logprobs=mean, choices=list(piece.choices),
                                      prompt_tokens=sum(o.meta_info["prompt_tokens"] for o in outputs),
                                      cached_tokens=sum(o.meta_info["cached_tokens"] for o in outputs))
