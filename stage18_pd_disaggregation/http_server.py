"""The OpenAI-compatible HTTP server: routes, streaming, errors.

    client ──HTTP──▶ route (parse, validate, tokenize) ──▶ TokenizerManager ──pipe──▶ engine process
    client ◀─JSON / Server-Sent Events── route ◀── (index, update) per choice ◀──┘

Every route runs on one asyncio loop; no handler ever blocks it on the
engine: a handler awaits its requests' updates and the engine process keeps
stepping for everyone else. Streams use Server-Sent Events, one ``data:``
line per chunk and ``data: [DONE]`` at the end, as OpenAI's do. Beside
OpenAI's routes the server speaks SGLang's native ``/generate``
(``native_api.py``), through the same generation path.

Stage 15: a request may run with a LoRA adapter, and adapters can be loaded
and unloaded while the server runs (``adapter_routes.py``).

Stage 16: ``dp_size`` engine replicas serve behind this one front end; the
router picks a replica per request (``router.py``), and ``/health`` says
``degraded`` while some replicas are down.

A client that goes away stops its requests: for a stream, when writing to it
fails (the stream generator is closed and aborts what is still running); for
a plain request, when the periodic check below sees the disconnect.

No single request may stall the loop or the engine: a body over
``--max-request-bytes`` is refused (413) before it is read, parsing and
tokenizing run on the tokenizer thread, and a prompt that cannot fit the
context is refused here, before it ever crosses to the engine.
"""

import asyncio
import contextlib
import json
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from . import openai_protocol as protocol
from .adapter_routes import adapter_cards, adapter_of, add_adapter_routes, check_model
from .api_key import APIKeyCheck
from .native_api import NativeChoices, max_new_tokens, parse_generate_request
from .openai_choices import ChatChoices, CompletionChoices
from .openai_protocol import BadRequest, ChatCompletionRequest, CompletionRequest, SamplingFields
from .profile_routes import add_profile_routes
from .reasoning_parser import starts_in_reasoning
from .request_body import read_body
from .server_args import MAX_REQUEST_BYTES, ServerArgs
from .tokenizer_manager import EngineError, TokenizerManager

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def build_app(manager: TokenizerManager, model_name: str, api_key: str | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES, admin_api_key: str | None = None,
              reasoning_parser: str | None = None) -> FastAPI:
    """The FastAPI app serving ``manager``'s engine under the name ``model_name``; with ``api_key``,
    every route but /health needs it (the admin routes need ``admin_api_key`` when it is set)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start(asyncio.get_running_loop())
        yield
        manager.shutdown()  # here, not after uvicorn returns: on SIGTERM uvicorn re-raises the signal and exits

    app = FastAPI(title="qwen3-ladder", lifespan=lifespan)
    if api_key is not None or admin_api_key is not None:
        app.add_middleware(APIKeyCheck, api_key=api_key, admin_api_key=admin_api_key)

    @app.exception_handler(BadRequest)
    async def bad_request(_, error: BadRequest):
        return JSONResponse(protocol.error_body(str(error), error.status, error.param), status_code=error.status)

    @app.exception_handler(EngineError)
    async def engine_error(_, error: EngineError):
        return JSONResponse(protocol.error_body(str(error), error.status), status_code=error.status)

    add_info_routes(app, manager, model_name)
    add_adapter_routes(app, manager, model_name, max_request_bytes)
    add_generation_routes(app, manager, model_name, max_request_bytes, reasoning_parser)
    add_profile_routes(app, manager, max_request_bytes)
    return app


def add_info_routes(app: FastAPI, manager: TokenizerManager, model_name: str) -> None:
    """/health, /v1/models and /metrics."""

    @app.get("/health")
    async def health():
        if not manager.engine_alive:
            return Response(status_code=503, content="the engine processes exited; they are being restarted")
        down = manager.engines.down()  # stage 16: some replicas serve, others are gone (and being restarted)
        return Response(status_code=200, content=f"degraded: replicas {down} are down" if down else "")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "qwen3-ladder",
                "max_model_len": manager.context_length}
        return {"object": "list", "data": [card] + adapter_cards(manager, model_name, created)}

    @app.get("/metrics")
    async def metrics():
        return Response(manager.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/get_model_info")
    async def model_info():  # SGLang's: where a client (lang's RuntimeEndpoint) finds the tokenizer
        return {"model_path": model_name, "tokenizer_path": str(manager.model_folder), "is_generation": True}


def add_generation_routes(app: FastAPI, manager: TokenizerManager, model_name: str, max_request_bytes: int,
                          reasoning_parser: str | None) -> None:
    """/v1/completions, /v1/chat/completions and SGLang's /generate: parse and tokenize (on a tokenizer
    thread), then generate."""

    def parse(model: type, http_body: bytes):
        request = protocol.parse_request(model, http_body)
        check_model(request, manager, model_name)  # the base model, or an adapter served now
        return request

    def parse_completion(body: bytes):  # on the tokenizer thread
        request = parse(CompletionRequest, body)
        return request, completion_prompts(manager, request.prompt)

    def parse_chat(body: bytes):  # on the tokenizer thread
        request = parse(ChatCompletionRequest, body)
        if not request.messages:
            raise BadRequest("messages must hold at least one message", "messages")
        if len(request.messages) > manager.context_length:  # each message is at least a token
            raise BadRequest(f"{len(request.messages)} messages cannot fit the model's context of "
                             f"{manager.context_length} tokens", "messages")
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.uses_tools else None
        try:
            prompt_text, prompt_ids = manager.apply_chat_template(
                [m.as_template_input() for m in request.messages], tools, request.chat_template_kwargs)
        except ValueError as error:
            raise BadRequest(str(error), "tools" if tools and "tools" in str(error) else "messages") from None
        except Exception as error:  # noqa: BLE001 - the template itself failed (raise_exception, a bad variable)
            raise BadRequest(f"the chat template failed: {error}", "messages") from None
        return request, prompt_text, prompt_ids

    @app.post("/v1/completions")
    async def completions(http_request: HTTPRequest):
        body = await read_body(http_request, max_request_bytes)
        request, prompts = await manager.run_on_tokenizer_thread(parse_completion, body)
        choices = CompletionChoices(request, prompts, manager.token_text, manager.tokenizer.decode)
        return await generate(manager, model_name, http_request, request, prompts, [request.max_tokens] * len(prompts),
                              choices, adapter_of(request, model_name))

    def parse_generate(body: bytes):  # on the tokenizer thread
        request, prompts, native = parse_generate_request(body, manager.encode)
        check_model(request, manager, model_name)  # its lora_path, if any, is served now
        return request, prompts, native

    @app.post("/generate")
    async def generate_native(http_request: HTTPRequest):
        """SGLang's native endpoint (native_api.py)."""
        body = await read_body(http_request, max_request_bytes)
        request, prompts, native = await manager.run_on_tokenizer_thread(parse_generate, body)
        choices = NativeChoices(native, request, prompts, manager.token_text)
        limits = [max_new_tokens(native)] * len(prompts)
        return await generate(manager, model_name, http_request, request, prompts, limits, choices, adapter_of(request, model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: HTTPRequest):
        body = await read_body(http_request, max_request_bytes)
        request, prompt_text, prompt_ids = await manager.run_on_tokenizer_thread(parse_chat, body)
        in_reasoning = reasoning_parser is not None and starts_in_reasoning(reasoning_parser, prompt_text)
        choices = ChatChoices(request, manager.token_text, reasoning_parser is not None, in_reasoning)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        return await generate(manager, model_name, http_request, request, [prompt_ids], [max_tokens], choices, adapter_of(request, model_name))


async def generate(manager: TokenizerManager, model_name: str, http_request: HTTPRequest,
                   request: SamplingFields, prompts, max_tokens, choices, adapter: str | None):
    """Run n choices per prompt; answer with one JSON body, or a stream of chunks, which
    ``choices`` (openai_choices.py) shapes for its endpoint."""
    params = []
    for prompt_ids, limit in zip(prompts, max_tokens):
        if len(prompt_ids) >= manager.context_length:  # refused here: a huge prompt never crosses the pipe
            raise BadRequest(f"the prompt has {len(prompt_ids):,} tokens but the model's context is "
                             f"{manager.context_length} tokens; shorten it", "prompt")
        if limit is None:  # up to the context (the engine refuses a prompt that fills it)
            limit = max(1, manager.context_length - len(prompt_ids))
        elif 0 < len(prompt_ids) < manager.context_length < len(prompt_ids) + limit:  # as OpenAI and vLLM answer
            field = choices.max_tokens_field  # max_tokens, or /generate's sampling_params.max_new_tokens
            raise BadRequest(f"the prompt has {len(prompt_ids)} tokens and {field} is {limit}, "
                             f"{len(prompt_ids) + limit} in all, but the model's context is {manager.context_length} "
                             f"tokens; lower {field} or shorten the prompt", field)
        params += request.sampling_params(choices.engine_max_tokens(limit), **choices.logprobs)
    group_prompts = [ids for ids in prompts for _ in range(request.n)]
    stream_ids = request.stream and choices.streams_ids  # a /generate stream shows the ids so far
    group = manager.generate(group_prompts, params, adapter, request.bootstrap(), stream_ids=stream_ids)
    rid = protocol.new_id(choices.id_prefix)
    name = request.model or model_name  # answers name the model (or adapter) asked for
    if request.stream:
        first = await anext(group)  # waits for acceptance: a refusal still gets its status code
        events = stream_events(group, first, rid, name, request, choices, len(group_prompts))
        return StreamingResponse(events, media_type="text/event-stream")
    outputs = await collect_unless_disconnected(http_request, group, len(group_prompts))
    if outputs is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    answers = [choices.final(i, output) for i, output in enumerate(outputs)]
    return choices.response(rid, name, answers, protocol.usage(choices.usage_outputs(outputs), request.n))


async def stream_events(group, first, rid: str, served_as: str, request: SamplingFields, choices, count: int):
    """The Server-Sent Events of one streamed request; closing it aborts what still runs."""
    outputs = [None] * count
    try:
        for body in choices.opening(rid, served_as):
            yield sse(body)
        async for index, update in prepend(first, group):
            if update.output is not None:
                outputs[index] = update.output
            for body in choices.chunks(rid, served_as, index, update):
                yield sse(body)
        if request.include_usage:
            usage = protocol.usage(choices.usage_outputs(outputs), request.n)
            yield sse(protocol.usage_chunk(rid, served_as, choices.object_kind, usage))
        yield "data: [DONE]\n\n"
    except EngineError as error:  # the engine failed mid-stream: the status line is already sent
        yield sse(protocol.error_body(str(error), error.status))
        yield "data: [DONE]\n\n"
    finally:
        await group.aclose()


def completion_prompts(manager: TokenizerManager, prompt) -> list[list[int]]:
    """A completions ``prompt`` (text, token ids, or a list of either) as token-id lists."""
    if not prompt and not isinstance(prompt, str):
        raise BadRequest("prompt is an empty list", "prompt")
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    try:
        return [manager.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    except ValueError as error:  # text far too long for the context
        raise BadRequest(str(error), "prompt") from None


async def prepend(first, rest):
    """``first``, then everything ``rest`` yields."""
    yield first
    async for item in rest:
        yield item


async def collect_unless_disconnected(http_request: HTTPRequest, group, count: int) -> list | None:
    """Every output of ``group``; None (and the requests aborted) if the client goes away first."""

    async def collect():
        outputs = [None] * count
        async with contextlib.aclosing(group):
            async for index, update in group:
                if update.output is not None:
                    outputs[index] = update.output
        return outputs

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await http_request.is_disconnected():
            task.cancel()  # closes the group, which aborts its requests
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def serve(args: ServerArgs) -> None:
    """Start the engine processes (``dp_size`` replicas), then serve HTTP until interrupted (Ctrl-C or
    SIGTERM). Requests must name the served model (``served_model_name``, else the model path)."""
    manager = TokenizerManager(args.engine_kwargs(), args.max_queued_requests, args.dp_size, args.load_balance_method)
    try:
        model_name = args.served_model_name or args.model_path or Path(manager.model_folder).name
        print(f"serving {model_name} on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
        app = build_app(manager, model_name, args.api_key, args.max_request_bytes, args.admin_api_key,
                        reasoning_parser=args.reasoning_parser)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        manager.shutdown()  # when uvicorn could not start (a port in use), the lifespan never ran
