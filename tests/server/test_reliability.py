"""One request must not take the server down (stage 11 on).

A server with ``--api-key`` and a small ``--max-request-bytes``, driven as a
careless or hostile client would: oversized bodies, prompts far longer than
the context, lists of stop strings; a large request while small ones and
``/health`` must still be answered; and an engine process killed mid-stream,
after which the server must serve again on its own.
"""

import asyncio
import importlib
import json
import os
import signal
import threading
import time

import openai
import pytest

from conftest import SERVER_STAGES
from test_server import CONTEXT, PROMPTS, Server, http, idle

KEY = "test-key"
LIMIT = 4_000_000  # --max-request-bytes
RESTART_TIMEOUT_S = 180  # a generous bound on a restart (on a busy two-core machine, start-up takes seconds)


@pytest.fixture(scope="module", params=SERVER_STAGES)
def server_stage(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(server_stage, builtin_folder):
    server = Server(server_stage, "--context-length", str(CONTEXT), "--api-key", KEY,
                    "--max-request-bytes", str(LIMIT))
    server.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield server
    server.stop()


def post(server, route: str, body: dict | bytes, key: str | None = KEY, timeout: float = 120) -> tuple[int, dict]:
    """POST with the API key; the status and the JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, answer = http("POST", f"{server.url}/v1/{route}", data, timeout, headers)
    return status, json.loads(answer)


# ----- --api-key ----------------------------------------------------------------------------------


def test_the_api_key_is_required_everywhere_but_health(server):
    assert http("GET", f"{server.url}/health")[0] == 200
    assert http("GET", f"{server.url}/v1/models")[0] == 401
    assert http("GET", f"{server.url}/metrics")[0] == 401
    status, answer = post(server, "completions", {"model": "m", "prompt": "hi", "max_tokens": 1}, key="wrong")
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    for key in ("wrong", "none"):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="m", prompt="hi", max_tokens=1)
    reply = server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stage", SERVER_STAGES)
def test_the_api_key_middleware_refuses_a_wrong_key_in_every_serving_stage(stage):
    """``api_key.py`` on its own (no server to start): 401 without the key or with another, the app
    reached with it, /health always."""
    check = importlib.import_module(f"{stage}.api_key").APIKeyCheck

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def status(path: str, header: bytes | None) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "method": "GET", "headers": [(b"authorization", header)] if header else []}
        asyncio.run(check(app, api_key=KEY)(scope, receive, send))
        return sent[0]["status"]

    assert status("/v1/models", None) == 401 and status("/v1/models", b"Bearer other") == 401
    assert status("/v1/models", f"Bearer {KEY}".encode()) == 200 and status("/health", None) == 200


# ----- bounded input ------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413_unread(server):
    body = {"model": "m", "prompt": "a" * (LIMIT + 1000), "max_tokens": 1}
    status, answer = post(server, "completions", body)
    assert status == 413 and "--max-request-bytes" in answer["error"]["message"]
    status, _ = post(server, "chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a" * LIMIT}]})
    assert status == 413


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_text_far_longer_than_the_context_is_refused_naming_the_context(server, route):
    text = "hello world " * (LIMIT // 24)  # 2 MB, under the body limit: tokenizing it all would take seconds
    body = {"model": "m", "max_tokens": 1, **({"prompt": text} if route == "completions" else
                                             {"messages": [{"role": "user", "content": text}]})}
    status, answer = post(server, route, body)
    assert status == 400 and f"context is {CONTEXT}" in answer["error"]["message"], answer


def test_a_token_id_prompt_longer_than_the_context_is_refused_in_the_front_end(server):
    status, answer = post(server, "completions", {"model": "m", "prompt": [5] * 200_000, "max_tokens": 1})
    assert status == 400 and "200,000 tokens" in answer["error"]["message"]


@pytest.mark.parametrize("field, value", [("stop", ["x"] * 65), ("stop_token_ids", [3] * 1025)])
def test_long_stop_lists_are_refused(server, field, value):
    status, answer = post(server, "completions", {"model": "m", "prompt": "hi", "max_tokens": 1, field: value})
    assert status == 400 and answer["error"]["param"] == field


def test_too_many_messages_for_the_context_are_refused(server):
    messages = [{"role": "user", "content": "hi"}] * (CONTEXT + 1)
    status, answer = post(server, "chat/completions", {"model": "m", "messages": messages})
    assert status == 400 and answer["error"]["param"] == "messages"


# ----- a responsive front end ----------------------------------------------------------------------


def test_health_and_a_small_request_are_answered_while_a_large_one_is_tokenized(server):
    """A completion of 5,400 prompts (each fits the context) is tokenized in full (seconds), then
    refused (prompt + max_tokens overflow the context). Meanwhile /health answers and a small
    request streams its first token: the tokenizing runs off the event loop, on the tokenizer threads."""
    large = {"model": "m", "prompt": ["The history of the printing press " * 20] * 5400, "max_tokens": CONTEXT}
    done: dict[str, float] = {}

    def send_large():
        status, _ = post(server, "completions", large)
        done["large"] = time.monotonic()
        done["large_status"] = status

    thread = threading.Thread(target=send_large)
    thread.start()
    time.sleep(0.3)  # the large request is being parsed and tokenized now
    assert http("GET", f"{server.url}/health")[0] == 200
    done["health"] = time.monotonic()
    stream = server.client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=2, temperature=0, stream=True)
    first = next(iter(stream))
    done["small"] = time.monotonic()
    thread.join()
    assert done["large_status"] == 400 and first.choices[0].text
    assert done["health"] < done["large"] and done["small"] < done["large"], done


# ----- an engine that dies comes back ----------------------------------------------------------------


def test_a_killed_engine_fails_its_stream_then_is_restarted_and_serves(builtin_folder):
    """Stage 11, where the engine process enters (stage 16 restarts a replica of two:
    tests/stage16_data_parallel/test_data_parallel.py)."""
    server = Server(SERVER_STAGES[0], "--context-length", str(CONTEXT))
    try:
        stream = server.client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=CONTEXT - 16,
                                                  temperature=0, extra_body={"ignore_eos": True}, stream=True)
        assert next(iter(stream)).choices
        os.kill(server.engine_processes()[0], signal.SIGKILL)
        with pytest.raises(Exception, match="exited"):  # the stream ends with the error event
            for _ in stream:
                pass
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while http("GET", f"{server.url}/health")[0] != 200:
            assert time.monotonic() < deadline, f"the engine was not restarted:\n{server.output()}"
            time.sleep(0.5)
        reply = server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason == "length"
        server.wait_for_metrics(idle)  # nothing of the failed request is left running or holding pages
        log = server.output()
        assert "killed by SIGKILL" in log and "serving again" in log, log
    finally:
        server.stop()
