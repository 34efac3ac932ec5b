"""The pieces of an LM program: text, a role around some pieces, ``gen`` and ``select``.

A program adds them to its state (``s += user("Hi")``); the state runs each
one as it is added (``state.py``). They hold what was asked and nothing else.
"""

import dataclasses

CHOICES_METHODS = ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized")
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class Gen:
    """Generate text, stored as ``state[name]``; the keywords are the engine's sampling parameters."""

    name: str | None
    sampling: dict


@dataclasses.dataclass
class Select:
    """Pick one of ``choices`` by the model's likelihood of each after the text so far."""

    name: str | None
    choices: list[str]
    choices_method: str


@dataclasses.dataclass
class Role:
    """Pieces said by ``role`` (system, user or assistant): one chat message."""

    role: str
    pieces: tuple


def gen(name: str | None = None, max_tokens: int = 128, stop: str | list[str] | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        regex: str | None = None, json_schema: str | dict | None = None, **sampling) -> Gen:
    """Generate up to ``max_tokens`` tokens at this point of the program (SGLang's ``gen``)."""
    given = dict(max_tokens=max_tokens, stop=stop, temperature=temperature, top_p=top_p, top_k=top_k, regex=regex,
                 json_schema=json_schema, **sampling)
    return Gen(name, {key: value for key, value in given.items() if value is not None})


def select(name: str | None = None, choices: list[str] | None = None,
           choices_method: str = "token_length_normalized") -> Select:
    """Choose among ``choices`` (SGLang's ``select``). ``choices_method``: token_length_normalized
    (the mean log-probability of a choice's tokens), greedy_token_selection (its first token's),
    or unconditional_likelihood_normalized (the mean minus the same choice's mean with no text before it)."""
    if not choices:
        raise ValueError(f"select({name!r}) needs a non-empty list of choices")
    if choices_method not in CHOICES_METHODS:
        raise ValueError(f"choices_method {choices_method!r} is not one of {CHOICES_METHODS}")
    return Select(name, [str(choice) for choice in choices], choices_method)


def system(*pieces) -> Role:
    return Role("system", pieces)


def user(*pieces) -> Role:
    return Role("user", pieces)


def assistant(*pieces) -> Role:
    return Role("assistant", pieces)
