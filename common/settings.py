"""A stage's settings as one dataclass: each field is a flag, an ``Engine`` keyword and its checks, once.

SGLang keeps every setting of a server in one dataclass (``ServerArgs``) and
generates its command line from it; each stage here does the same with its
``EngineArgs`` (``engine_args.py``):

    @dataclasses.dataclass
    class EngineArgs(Settings):
        page_size: int = setting(16, "tokens per KV page", check=positive)

That one line is the flag ``--page-size`` (its type, default, help and
choices), the keyword ``Engine(page_size=...)``, and the check that refuses
``page_size=0`` or ``page_size="16"`` with a message that names the field.
The engine, its model runner and its worker processes receive the object
whole, so adding a setting to a stage is one field plus the line that uses it.
"""

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable

# A check returns what is wrong with a value ("must be positive"), or None when it is fine.
Check = Callable[[typing.Any], str | None]


def setting(default, help: str, *, choices=None, check: Check | None = None, group: str = "engine",
            metavar: str | None = None, parse: Callable | None = None):
    """A field of a settings dataclass, with what its flag and its check need.

    ``choices`` limits the value (each item, for a list); ``check`` adds a rule
    (``positive``, ``at_least(0)``, ...); ``group`` is the ``--help`` section;
    ``parse`` turns the flag's text into the value (default: the field's type).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, check=check, group=group, metavar=metavar, parse=parse))


def positive(value) -> str | None:
    return None if value >= 1 else "must be a positive integer"


def positive_number(value) -> str | None:
    return None if value > 0 else "must be a positive number"


def at_least(least: int) -> Check:
    return lambda value: None if value >= least else f"must be an integer of at least {least}"


class Settings:
    """The base of a stage's settings dataclass: checks on construction, flags, keywords."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            if not _fits(value, hints[field.name]):
                raise ValueError(f"{field.name}={value!r} must be {_describe(hints[field.name])}")
            if value is None:
                continue
            choices = meta.get("choices")  # of the flag's values: Engine(dtype=torch.float16) is the stage's to check
            kind = _flag_kind(hints[field.name])
            if choices is not None and any(item not in choices for item in _items(value) if kind is list or isinstance(item, kind)):
                raise ValueError(f"{field.name}={value!r} is not one of {list(choices)}")
            complaint = meta.get("check") and meta["check"](value)
            if complaint:
                raise ValueError(f"{field.name}={value!r} {complaint}")
        self.validate()

    def validate(self) -> None:
        """Rules that tie several fields together, and values put in their working form (a stage's own)."""

    @classmethod
    def from_kwargs(cls, **kwargs):
        """Build from keywords, refusing a name that is not a setting (with the nearest one that is)."""
        names = [field.name for field in dataclasses.fields(cls)]
        for name in kwargs:
            if name not in names:
                near = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; the settings are {names}"
                raise ValueError(f"{name!r} is not a setting of this engine{hint}")
        return cls(**kwargs)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``page_size`` -> ``--page-size``), in ``--help`` sections by group."""
        hints, groups = typing.get_type_hints(cls), {}
        for field in dataclasses.fields(cls):
            meta = field.metadata
            if meta.get("group") not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            flag, help = "--" + field.name.replace("_", "-"), meta["help"].replace("%", "%%")
            kind = _flag_kind(hints[field.name])
            if kind is bool:  # a switch: the field's default is False
                groups[meta["group"]].add_argument(flag, action="store_true", help=help)
                continue
            options = dict(default=field.default, help=help, type=meta["parse"] or (str if kind is list else kind))
            if kind is list:
                options["nargs"] = "+"
            if meta["choices"] is not None:
                options["choices"] = list(meta["choices"])
            if meta["metavar"]:
                options["metavar"] = meta["metavar"]
            groups[meta["group"]].add_argument(flag, **options)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace):
        """The settings parsed by a parser ``add_arguments`` filled (other flags are left out)."""
        return cls(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(cls)})

    def fields_of(self, other: type) -> dict:
        """The values of ``other``'s fields (a settings class this one extends), as keywords."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(other)}


def _union_members(kind) -> tuple:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _fits(value, kind) -> bool:
    """Whether ``value`` is of the annotated type (``int`` refuses ``True``; ``float`` takes an int)."""
    for member in _union_members(kind):
        base = typing.get_origin(member) or member
        if member is type(None):
            fits = value is None
        elif base is float:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif base is int:
            fits = isinstance(value, int) and not isinstance(value, bool)
        elif base is list:
            fits = isinstance(value, (list, tuple))
        else:
            fits = isinstance(value, base)
        if fits:
            return True
    return False


WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False", list: "a list", dict: "a dict"}


def _describe(kind) -> str:
    words = []
    for member in _union_members(kind):
        base = typing.get_origin(member) or member
        words.append("None" if member is type(None) else WORDS.get(base) or f"a {getattr(base, '__name__', base)}")
    return " or ".join(words)


def _flag_kind(kind) -> type:
    """The type a flag parses to: the first of the field's types that is not None."""
    member = next(m for m in _union_members(kind) if m is not type(None))
    base = typing.get_origin(member) or member
    return list if base in (list, dict) else base


def _items(value) -> list:
    return list(value) if isinstance(value, (list, tuple, dict)) else [value]
