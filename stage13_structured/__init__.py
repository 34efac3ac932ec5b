"""Stage 13 (structured outputs): a request's output follows a JSON schema, a regex or an EBNF grammar.

``json_schema``, ``regex`` or ``ebnf`` in its SamplingParams (SGLang's
names); llguidance compiles the grammar against the tokenizer, each step
masks the tokens it forbids before sampling, tokens it forces are appended
without sampling (jump-forward), and the request ends when the grammar is
complete (``grammar.py``). The server takes OpenAI's ``response_format``.
Everything else is stage 12."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
