"""The OpenAI API's request and response shapes, as far as this server speaks them.

Requests are pydantic models in strict mode: a string where a number belongs
is an error, not a guess, and a field this server does not implement is an
error naming it, never silently ignored. Values are then checked by
``SamplingParams``, the same checks the Python API makes, so the server and
``Engine.generate`` refuse the same things with the same messages. Responses
are plain dicts shaped as OpenAI's (``text_completion``, ``chat.completion``
and their streaming ``*.chunk`` forms); the official ``openai`` client reads
them. Log-probabilities come in OpenAI's two shapes: ``logprobs.content``
for chat, and the older ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset`` lists for completions (what evaluation harnesses read).
Structured outputs: OpenAI's ``response_format`` (``json_object``, or
``json_schema`` with a schema), and SGLang's extra fields ``regex`` and
``ebnf``; at most one of them.
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.sampling import MAX_TOP_LOGPROBS

from .request import GenerateOutput
from .sampling_params import SamplingParams

MAX_CHOICES = 128  # n above this is refused (OpenAI's own limit)
MAX_STOP_STRINGS = 64  # each is checked against every request's new text every step (OpenAI allows 4)
MAX_STOP_TOKEN_IDS = 1024


class BadRequest(Exception):
    """The request is invalid: answered with HTTP 400 (404 for an unknown model) and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # a field we do not implement is refused, not ignored


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str
    schema_: dict | None = Field(default=None, alias="schema")  # ("schema" is a BaseModel method's name)
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> dict:
        """The SamplingParams grammar field this format asks for."""
        if self.type == "json_object":
            return {"json_schema": '{"type": "object"}'}
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise BadRequest("response_format of type json_schema needs json_schema.schema", "response_format")
            return {"json_schema": self.json_schema.schema_}
        return {}


class SamplingFields(StrictModel):
    """Fields both endpoints share. ``top_k``, ``min_p``, ``repetition_penalty``,
    ``stop_token_ids`` and ``ignore_eos`` are extensions that SGLang and vLLM accept too."""

    model: str | None = None
    user: str | None = None  # an end-user id for the provider's abuse monitoring: nothing to do here
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    regex: str | None = None  # SGLang's extra fields: the output matches this regular expression,
    ebnf: str | None = None  # or follows this grammar
    lora_path: str | None = None  # SGLang's extra field: the adapter to run with (or name it as ``model``)
    # Stage 18, SGLang's fields that its PD router adds: the prefill engine that computes the prompt
    # (its bootstrap address) and the number matching the request on the prefill and decode engines.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    def bootstrap(self) -> dict | None:
        """The request's disaggregation fields, or None when it has none."""
        if self.bootstrap_room is None:
            return None
        return dict(bootstrap_host=self.bootstrap_host, bootstrap_port=self.bootstrap_port,
                    bootstrap_room=self.bootstrap_room)

    def grammar(self) -> dict:
        """The request's grammar as SamplingParams fields (SamplingParams refuses more than one)."""
        grammar = self.response_format.grammar() if self.response_format is not None else {}
        return grammar | {name: getattr(self, name) for name in ("regex", "ebnf") if getattr(self, name) is not None}

    def sampling_params(self, max_tokens: int, **logprobs) -> list[SamplingParams]:
        """One SamplingParams per choice; choice ``i`` of a seeded request uses ``seed + i``.
        ``logprobs``: SGLang's return_logprob / top_logprobs_num / logprob_start_len."""
        if not 1 <= self.n <= MAX_CHOICES:
            raise BadRequest(f"n={self.n} is invalid: must be in [1, {MAX_CHOICES}]", "n")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise BadRequest(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                             "are allowed", "stop_token_ids")
        grammar = self.grammar()
        try:
            return [
                SamplingParams(
                    max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                    stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                    seed=None if self.seed is None else self.seed + i, **logprobs, **grammar,
                )
                for i in range(self.n)
            ]
        except ValueError as error:
            raise BadRequest(str(error), str(error).split("=")[0]) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a prompt (text or token ids, or a list of either) to continue."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # the chosen token's log-probability and this many alternatives
    echo: bool = False  # the prompt comes back before the completion (with its log-probabilities)

    def logprob_params(self) -> dict:
        if self.logprobs is None:
            return {}
        check_top_logprobs(self.logprobs, "logprobs")
        return dict(return_logprob=True, top_logprobs_num=self.logprobs, logprob_start_len=0 if self.echo else -1)


class ContentPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer: which call it answers

    def as_template_input(self) -> dict:
        """The message as a chat template expects it: role, plain-text content, and the tool
        fields where present (a template renders tool calls and their results its own way)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        for name in ("name", "tool_call_id"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        return message


class FunctionDefinition(StrictModel):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: dict


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: a conversation; the reply follows the model's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # none given: up to the model's context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # every <tool_call> in the reply is returned
    chat_template_kwargs: dict | None = None  # the template's own variables: {"enable_thinking": false} for Qwen3
    separate_reasoning: bool = True  # with --reasoning-parser: reasoning in reasoning_content (SGLang's field)

    def logprob_params(self) -> dict:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
        if not self.logprobs:
            return {}
        check_top_logprobs(self.top_logprobs or 0, "top_logprobs")
        return dict(return_logprob=True, top_logprobs_num=self.top_logprobs or 0)

    @property
    def uses_tools(self) -> bool:
        """Tools are offered to the model (rendered, and its tool calls parsed)."""
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise BadRequest("tool_choice needs tools", "tool_choice")
        if self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice):
            # Forcing a call needs the output constrained to a grammar (stage 13 on).
            raise BadRequest("tool_choice 'required' or a named function needs constrained decoding, which this "
                             "server does not have; use 'auto'", "tool_choice")
        return bool(self.tools) and self.tool_choice != "none"


def check_top_logprobs(value: int, field: str) -> None:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{field}={value} is invalid: must be in [0, {MAX_TOP_LOGPROBS}]", field)


def parse_request(model: type[StrictModel], body: bytes) -> StrictModel:
    """Body bytes -> a request model, or BadRequest naming the first field that is wrong."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {first['msg']}") from None
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise BadRequest(f"{where} is not supported by this server", where) from None
        raise BadRequest(f"{where}: {first['msg']}", where or None) from None
    return request


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# ----- responses ------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(outputs: list[GenerateOutput], n: int) -> dict:
    """Token counts of a whole HTTP request. Choices come n per prompt; each prompt counts once."""
    prompt_tokens = sum(o.prompt_tokens for o in outputs[::n])
    completion_tokens = sum(o.completion_tokens for o in outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outputs)},
    }


def completion_response(rid: str, model: str, choices: list[dict], usage_info: dict) -> dict:
    """``choices``: ``{"text", "logprobs", "finish_reason", "matched_stop"}`` each."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, **choice} for i, choice in enumerate(choices)],
        "usage": usage_info,
    }


def chat_response(rid: str, model: str, choices: list[dict], usage_info: dict) -> dict:
    """``choices``: ``{"message", "logprobs", "finish_reason", "matched_stop"}`` each."""
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, **choice} for i, choice in enumerate(choices)],
        "usage": usage_info,
    }


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None, matched_stop: int | str | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [ending(choice, matched_stop)],
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None, matched_stop: int | str | None = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [ending(choice, matched_stop)],
    }


def ending(choice: dict, matched_stop: int | str | None) -> dict:
    """A stream's last chunk of a choice (the one with its finish_reason) also says what stopped it,
    as the whole response's choices do: SGLang's ``matched_stop``, a token id or a stop string."""
    return choice if choice["finish_reason"] is None else {**choice, "matched_stop": matched_stop}


def usage_chunk(rid: str, model: str, kind: str, usage_info: dict) -> dict:
    """The last chunk of a stream that asked for ``stream_options.include_usage``."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": usage_info}


# ----- log-probabilities ------------------------------------------------------------------------
# An entry is (token id, its log-probability or None, [(id, logprob)] alternatives or None);
# ``token_text`` turns a token id into its text.


def chat_logprobs(token_text, entries: list) -> dict:
    """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""

    def token(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**token(t, logprob), "top_logprobs": [token(i, v) for i, v in top or []]}
                        for t, logprob, top in entries]}


def completion_logprobs(token_text, entries: list, offset: int = 0) -> dict:
    """The completions shape: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict
    of the alternatives plus the chosen token, as OpenAI's legacy API gives) and ``text_offset``
    (where each token starts in the choice's text, from ``offset``)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, logprob, top in entries:
        text = token_text(token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        chosen = {} if logprob is None else {text: logprob}
        out["top_logprobs"].append(None if top is None else {**{token_text(i): v for i, v in top}, **chosen})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def output_entries(output: GenerateOutput) -> list:
    """The generated tokens of an output as log-probability entries."""
    return list(zip(output.token_ids, output.output_token_logprobs, output.output_top_logprobs))


def prompt_entries(prompt_ids: list[int], output: GenerateOutput) -> list:
    """The prompt's tokens as entries (an output asked with logprob_start_len=0); the first has no score."""
    return list(zip(prompt_ids, output.input_token_logprobs, output.input_top_logprobs))
