"""SGLang's native API: ``POST /generate``, and the shapes of its requests and answers.

SGLang serves its own endpoint beside OpenAI's, and its users (and its
frontend language, ``lang/``'s ``RuntimeEndpoint``) call it directly:

    {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    -> {"text": " Paris...", "output_ids": [...], "meta_info": {"id", "finish_reason": {"type": "length",
        "length": 16}, "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}}

The prompt is ``text`` or ``input_ids``; a list of either is a batch, and
the answer is then a list (as it is for ``n`` > 1). ``return_logprob`` adds
log-probabilities to ``meta_info`` as ``[logprob, token id, text or null]``
entries: ``output_token_logprobs``, ``output_top_logprobs`` (the
``top_logprobs_num`` most likely tokens at each step) and, from prompt
position ``logprob_start_len`` on, ``input_token_logprobs`` and
``input_top_logprobs`` (the first prompt token has none: nothing predicts
it). ``max_new_tokens: 0`` scores a prompt without generating (how
``select`` is run over HTTP). A stream (``"stream": true``) sends
Server-Sent Events whose ``text`` and ``output_ids`` are the whole text and
token ids so far, as SGLang's are; the last event of each output carries its
full ``meta_info``, and ``data: [DONE]`` ends the stream.

A request becomes the same ``SamplingFields`` the OpenAI routes build (the
``sampling_params`` names mapped onto OpenAI's), so both APIs refuse the
same things with the same checks, and a setting this stage does not have
(``regex`` before stage 13, ``lora_path`` before 15) is refused by name.
"""

import dataclasses
import json
import time
import uuid

from pydantic import ValidationError

from .engine_process import RequestUpdate
from .openai_protocol import BadRequest, SamplingFields, StrictModel, parse_request
from .request import GenerateOutput

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default
# sampling_params names that go to SamplingFields as they are, and those renamed on the way.
SAME_NAMES = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
              "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "n", "regex", "ebnf")
RENAMED = {"sampling_seed": "seed", "json_schema": "response_format"}


class GenerateReqInput(StrictModel):
    """The body of ``POST /generate`` (SGLang's ``GenerateReqInput``, the fields this server speaks)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    # Passed on to SamplingFields, which refuses them on a stage without the feature.
    lora_path: str | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    @property
    def is_batch(self) -> bool:
        prompt = self.text if self.text is not None else self.input_ids
        return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def parse_generate_request(body: bytes, encode) -> tuple[SamplingFields, list[list[int]], GenerateReqInput]:
    """Body bytes -> (the request as SamplingFields, the prompts' token ids, the request itself);
    ``BadRequest`` naming what is wrong. ``encode``: text -> token ids (bounded by the context)."""
    request = parse_request(GenerateReqInput, body)
    prompts = prompt_ids(request, encode)
    if isinstance(request.logprob_start_len, list) and len(request.logprob_start_len) != len(prompts):
        raise BadRequest(f"logprob_start_len has {len(request.logprob_start_len)} entries for {len(prompts)} "
                         "prompts", "logprob_start_len")
    if isinstance(request.rid, list) and len(request.rid) != len(prompts):
        raise BadRequest(f"rid has {len(request.rid)} entries for {len(prompts)} prompts", "rid")
    return sampling_fields(request, one_sampling_dict(request.sampling_params, len(prompts))), prompts, request


def prompt_ids(request: GenerateReqInput, encode) -> list[list[int]]:
    """The prompts as token-id lists: ``text`` (one or a list) or ``input_ids`` (one list or a list of them)."""
    if (request.text is None) == (request.input_ids is None):
        raise BadRequest("give either text or input_ids (one of them, not both)", "text")
    if request.text is not None:
        texts = [request.text] if isinstance(request.text, str) else request.text
        if not texts:
            raise BadRequest("text is an empty list", "text")
        try:
            return [encode(text) for text in texts]
        except ValueError as error:  # text far too long for the context
            raise BadRequest(str(error), "text") from None
    if not request.input_ids:
        raise BadRequest("input_ids is empty", "input_ids")
    return [list(request.input_ids)] if isinstance(request.input_ids[0], int) else [list(ids) for ids in request.input_ids]


def one_sampling_dict(sampling_params: dict | list[dict] | None, count: int) -> dict:
    """The batch's sampling_params: one dict, or a list of equal ones (one per prompt)."""
    if not isinstance(sampling_params, list):
        return sampling_params or {}
    if len(sampling_params) != count:
        raise BadRequest(f"sampling_params has {len(sampling_params)} entries for {count} prompts", "sampling_params")
    if any(params != sampling_params[0] for params in sampling_params):
        raise BadRequest("sampling_params differ between the prompts of one request; this server runs one "
                         "setting per request: send one request per setting", "sampling_params")
    return sampling_params[0] if sampling_params else {}


def sampling_fields(request: GenerateReqInput, params: dict) -> SamplingFields:
    """``sampling_params`` (SGLang's names) and the pass-through fields as the OpenAI routes' SamplingFields."""
    fields = {}
    for name, value in params.items():
        if name == "max_new_tokens":
            continue  # the route reads it (max_new_tokens below)
        if name not in SAME_NAMES and name not in RENAMED:
            raise BadRequest(f"sampling_params.{name} is not supported by this server", f"sampling_params.{name}")
        fields[RENAMED.get(name, name)] = value
    if "response_format" in fields:  # SGLang's json_schema is the schema itself, as a string
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema(fields)}}
    for name in ("lora_path", "bootstrap_host", "bootstrap_port", "bootstrap_room"):
        if getattr(request, name) is not None:
            fields[name] = getattr(request, name)
    fields["stream"] = request.stream
    try:
        return SamplingFields.model_validate_json(json.dumps(fields))
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        native = {v: k for k, v in RENAMED.items()}.get(name, name)
        where = native if native in GenerateReqInput.model_fields else f"sampling_params.{native}"
        if first["type"] == "extra_forbidden":
            raise BadRequest(f"{where} is not supported by this server", where) from None
        raise BadRequest(f"{where}: {first['msg']}", where) from None


def schema(fields: dict) -> dict:
    value = fields["response_format"]
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise BadRequest(f"sampling_params.json_schema is not valid JSON: {error}", "sampling_params.json_schema") from None
    if not isinstance(parsed, dict):
        raise BadRequest("sampling_params.json_schema must be a JSON object", "sampling_params.json_schema")
    return parsed


def max_new_tokens(request: GenerateReqInput) -> int:
    """The request's ``max_new_tokens`` (a list of sampling_params is one setting: parsing checked it)."""
    params = request.sampling_params
    params = (params[0] if params else {}) if isinstance(params, list) else params or {}
    value = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"sampling_params.max_new_tokens={value!r} is invalid: must be an integer >= 0",
                         "sampling_params.max_new_tokens")
    return value


class NativeChoices:
    """Outputs of ``/generate`` in SGLang's shape: whole, or as stream events (the same interface as
    ``openai_choices.py``'s classes, so the OpenAI routes' ``generate`` runs this endpoint too)."""

    id_prefix, object_kind = "generate", "generate"
    max_tokens_field = "sampling_params.max_new_tokens"  # what a request beyond the context is told to lower
    streams_ids = True  # each stream event carries the token ids so far, as SGLang's do

    def __init__(self, request: GenerateReqInput, fields: SamplingFields, prompts: list[list[int]], token_text):
        self.request, self.token_text, self.n = request, token_text, fields.n
        self.prompts = [ids for ids in prompts for _ in range(fields.n)]  # one per output
        self.batch = request.is_batch or fields.n > 1  # answered as a list
        self.score_only = max_new_tokens(request) == 0
        self.starts = [start for start in self._starts(len(prompts)) for _ in range(fields.n)]
        asked = [s for s in self.starts if s >= 0]
        # One logprob_start_len for the engine (the earliest asked); each output's own is cut from it.
        self.engine_start = min(asked) if asked else -1
        self.logprobs = dict(return_logprob=True, top_logprobs_num=request.top_logprobs_num,
                             logprob_start_len=self.engine_start) if request.return_logprob else {}
        rids = request.rid if isinstance(request.rid, list) else [request.rid] * len(prompts)
        self.rids = [self._rid(rid, i) for rid in rids for i in range(fields.n)]
        self.texts = [""] * len(self.prompts)  # streams: each output's text so far
        self.ids: list[list[int]] = [[] for _ in self.prompts]  # ... and its token ids
        self.entries: list[list] = [[] for _ in self.prompts]  # ... and its tokens' log-probability entries
        self.started = time.perf_counter()

    def _starts(self, count: int) -> list[int]:
        start = self.request.logprob_start_len
        return list(start) if isinstance(start, list) else [start] * count

    def _rid(self, rid: str | None, i: int) -> str:
        if rid is None:
            return uuid.uuid4().hex
        return rid if self.n == 1 else f"{rid}-{i}"

    def engine_max_tokens(self, max_tokens: int) -> int:
        return 1 if self.score_only else max_tokens  # a prefill always samples one token

    def _generated(self, output: GenerateOutput) -> GenerateOutput:
        if not self.score_only:
            return output
        return dataclasses.replace(output, text="", token_ids=[], completion_tokens=0, output_token_logprobs=[],
                                   output_top_logprobs=[], finish_reason="length", matched_stop=None)

    def usage_outputs(self, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
        return [self._generated(o) for o in outputs]

    # ----- whole answers ----------------------------------------------------------------------

    def final(self, index: int, output: GenerateOutput) -> dict:
        output = self._generated(output)
        meta = {"id": self.rids[index], "finish_reason": finish_reason(output), "prompt_tokens": output.prompt_tokens,
                "completion_tokens": output.completion_tokens, "cached_tokens": output.cached_tokens,
                "e2e_latency": round(time.perf_counter() - self.started, 4)}
        if self.request.return_logprob:
            meta |= self._output_logprobs(output.token_ids, output.output_token_logprobs, output.output_top_logprobs)
            meta |= self._input_logprobs(index, output)
        body = {"text": output.text, "output_ids": list(output.token_ids), "meta_info": meta}
        return {**body, "index": index} if self.batch and self.request.stream else body

    def response(self, rid: str, model: str, answers: list[dict], usage_info: dict):
        return answers if self.batch else answers[0]

    def _output_logprobs(self, ids, logprobs, tops) -> dict:
        return {"output_token_logprobs": [self._entry(lp, i) for i, lp in zip(ids, logprobs or [])],
                "output_top_logprobs": [self._top(top) for top in tops or []]}

    def _input_logprobs(self, index: int, output: GenerateOutput) -> dict:
        start = self.starts[index]
        if start < 0:
            return {"input_token_logprobs": [], "input_top_logprobs": []}
        skip = start - self.engine_start  # the engine scored from the batch's earliest start
        ids = self.prompts[index][start:]
        logprobs = (output.input_token_logprobs or [])[skip:]  # (the engine sets both lists together)
        tops = (output.input_top_logprobs or [])[skip:]
        return {"input_token_logprobs": [self._entry(lp, i) for i, lp in zip(ids, logprobs)],
                "input_top_logprobs": [self._top(top) for top in tops]}

    def _entry(self, logprob: float | None, token_id: int) -> list:
        """SGLang's entry: ``[logprob, token id, its text or None]``."""
        return [logprob, token_id, self.token_text(token_id) if self.request.return_text_in_logprobs else None]

    def _top(self, top) -> list | None:
        return None if top is None else [self._entry(lp, i) for i, lp in top]

    # ----- streams ------------------------------------------------------------------------------

    def opening(self, rid: str, model: str) -> list[dict]:
        return []

    def chunks(self, rid: str, model: str, index: int, update: RequestUpdate) -> list[dict]:
        """An event with the output's whole text and token ids so far; the output's last has its full meta_info."""
        if update.output is not None:
            return [self.final(index, update.output)]
        self.ids[index] += update.token_ids or []  # (the ids of text held back show in the next event)
        if self.score_only or not (update.text or update.logprobs):
            return []  # (a score's one sampled token is never shown)
        self.texts[index] += update.text
        self.entries[index] += update.logprobs or []
        meta = {"id": self.rids[index], "finish_reason": None, "prompt_tokens": len(self.prompts[index])}
        if self.request.return_logprob:
            ids, logprobs, tops = zip(*self.entries[index]) if self.entries[index] else ((), (), ())
            meta |= self._output_logprobs(ids, logprobs, tops)
        body = {"text": self.texts[index], "output_ids": list(self.ids[index]), "meta_info": meta}
        return [{**body, "index": index} if self.batch else body]


def finish_reason(output: GenerateOutput) -> dict:
    """SGLang's shape: ``{"type": "stop", "matched": token id or stop string}`` (no ``matched`` when a
    grammar ended the text), ``{"type": "length", "length": n}`` or ``{"type": "abort", "message"}``."""
    if output.finish_reason == "stop" and output.matched_stop is not None:
        return {"type": "stop", "matched": output.matched_stop}
    if output.finish_reason == "length":
        return {"type": "length", "length": output.completion_tokens}
    if output.finish_reason == "abort":
        return {"type": "abort", "message": output.error or "aborted"}
    return {"type": output.finish_reason}
