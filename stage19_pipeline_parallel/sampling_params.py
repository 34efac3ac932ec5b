"""Stage 13's SamplingParams: the shared sampling settings plus a grammar the output must follow.

SGLang's names: ``json_schema`` (a JSON Schema, as JSON text or a dict),
``regex`` (the whole output must match it) or ``ebnf`` (a grammar in SGLang's
EBNF form, ``root ::= "yes" | "no"``). At most one per request. Whether the
grammar compiles is checked by the engine, which holds the tokenizer
(``grammar.py``); here only its form.
"""

import json
from dataclasses import dataclass

from common.sampling import SamplingParams as BaseSamplingParams

GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")


@dataclass
class SamplingParams(BaseSamplingParams):
    """How to pick tokens and when to stop, and (at most) one grammar the output must follow."""

    json_schema: str | dict | None = None
    regex: str | None = None
    ebnf: str | None = None

    def validate(self) -> None:
        super().validate()
        given = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} are both set: give at most one of {list(GRAMMAR_FIELDS)}")
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)  # one text form: the grammar cache's key
        for name in given:
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be a non-empty string"
                                 + (" or a dict" if name == "json_schema" else ""))

    @property
    def grammar(self) -> tuple[str, str] | None:
        """``(field, source)`` of the request's grammar, or None when its output is free."""
        return next(((name, getattr(self, name)) for name in GRAMMAR_FIELDS if getattr(self, name) is not None), None)
