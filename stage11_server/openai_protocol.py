"""The OpenAI API's request and response shapes, as far as this server speaks them.

Requests are pydantic models in strict mode: a string where a number belongs
is an error, not a guess. Values are then checked by ``SamplingParams``, the
same checks the Python API makes, so the server and ``Engine.generate``
refuse the same things with the same messages. Responses are plain dicts
shaped as OpenAI's (``text_completion``, ``chat.completion`` and their
streaming ``*.chunk`` forms); the official ``openai`` client reads them.
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from common.sampling import SamplingParams

from .request import GenerateOutput

MAX_CHOICES = 128  # n above this is refused (OpenAI's own limit)


class BadRequest(Exception):
    """The request is invalid: answered with HTTP 400 and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown fields are ignored, as OpenAI's SDKs expect


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields both endpoints share. ``top_k``, ``min_p``, ``repetition_penalty``,
    ``stop_token_ids`` and ``ignore_eos`` are extensions that SGLang and vLLM accept too."""

    model: str | None = None
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

    def sampling_params(self, max_tokens: int) -> list[SamplingParams]:
        """One SamplingParams per choice; choice ``i`` of a seeded request uses ``seed + i``."""
        if not 1 <= self.n <= MAX_CHOICES:
            raise BadRequest(f"n={self.n} is invalid: must be in [1, {MAX_CHOICES}]", "n")
        try:
            return [
                SamplingParams(
                    max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                    stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                    seed=None if self.seed is None else self.seed + i,
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
    logprobs: int | None = None
    echo: bool = False


class ContentPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def as_template_input(self) -> dict:
        """The message as a chat template expects it: role and plain-text content."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: a conversation; the reply follows the model's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # none given: up to the model's context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False


def parse_request(model: type[StrictModel], body: bytes) -> StrictModel:
    """Body bytes -> a request model, or BadRequest naming the first field that is wrong."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {first['msg']}") from None
        where = ".".join(str(part) for part in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}", where or None) from None
    if request.logprobs:
        raise BadRequest("logprobs are not supported by this server", "logprobs")
    if getattr(request, "echo", False):
        raise BadRequest("echo is not supported by this server", "echo")
    return request


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}.get(status, "server_error")
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


def completion_response(rid: str, model: str, outputs: list[GenerateOutput], usage_info: dict) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason} for i, o in enumerate(outputs)
        ],
        "usage": usage_info,
    }


def chat_response(rid: str, model: str, outputs: list[GenerateOutput], usage_info: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
             "finish_reason": o.finish_reason}
            for i, o in enumerate(outputs)
        ],
        "usage": usage_info,
    }


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(rid: str, model: str, kind: str, usage_info: dict) -> dict:
    """The last chunk of a stream that asked for ``stream_options.include_usage``."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": usage_info}
