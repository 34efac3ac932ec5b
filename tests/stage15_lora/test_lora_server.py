"""Stage 15's server: ``model`` (or SGLang's ``lora_path``) picks an adapter, ``/v1/models`` lists
them, and ``/load_lora_adapter`` / ``/unload_lora_adapter`` change them while the server runs.
Each answer equals the engine's own for that adapter."""

import asyncio
import json

import pytest
from test_lora import ADAPTERS, write_adapter

from stage15_lora import Engine
from stage15_lora.api_key import APIKeyCheck
from test_server import Server, http

PROMPT = "Once upon a time"
ASK = dict(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(checkpoints["dense"], root / name, *ADAPTERS[name], seed=i)
            for i, name in enumerate(["qv", "all"])}


@pytest.fixture(scope="module")
def expected(checkpoints, adapters):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths=adapters) as engine:
        return {name: engine.generate(PROMPT, lora_path=name, **ASK).text for name in [None, "qv", "all"]}


@pytest.fixture(scope="module")
def server(checkpoints, adapters):
    server = Server("stage15_lora", "--model-path", str(checkpoints["dense"]), "--lora-paths", f"qv={adapters['qv']}",
                    "--max-lora-rank", "8", "--lora-target-modules", "all")
    yield server
    server.stop()


def post(server, path: str, body: dict) -> tuple[int, dict]:
    status, raw = http("POST", f"{server.url}{path}", json.dumps(body).encode())
    return status, json.loads(raw)


def test_model_names_an_adapter_and_lora_path_does_too(server, expected):
    ids = [card.id for card in server.client.models.list().data]
    assert ids == ["m", "qv"]
    reply = server.client.completions.create(model="qv", prompt=PROMPT, **ASK)
    assert reply.choices[0].text == expected["qv"] and reply.model == "qv"
    by_field = server.client.completions.create(model="m", prompt=PROMPT, extra_body={"lora_path": "qv"}, **ASK)
    assert by_field.choices[0].text == expected["qv"]
    streamed = server.client.completions.create(model="qv", prompt=PROMPT, stream=True, **ASK)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected["qv"]
    assert server.client.completions.create(model="m", prompt=PROMPT, **ASK).choices[0].text == expected[None]


def test_adapters_load_and_unload_at_run_time(server, adapters, expected):
    status, body = post(server, "/load_lora_adapter", {"lora_name": "all", "lora_path": adapters["all"]})
    assert status == 200 and body["success"] and set(body["loaded_adapters"]) == {"qv", "all"}
    assert server.client.completions.create(model="all", prompt=PROMPT, **ASK).choices[0].text == expected["all"]
    assert post(server, "/unload_lora_adapter", {"lora_name": "all"})[0] == 200
    assert [card.id for card in server.client.models.list().data] == ["m", "qv"]
    status, body = post(server, "/v1/completions", {"model": "all", "prompt": PROMPT, **ASK})
    assert status == 404 and "all" in body["error"]["message"]


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", {"model": "m", "prompt": PROMPT, "lora_path": "nope"}, 400, "no LoRA adapter named 'nope'"),
    ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}, 400, "adapter_config.json"),
    ("/load_lora_adapter", {"lora_name": "qv", "lora_path": "/nowhere"}, 400, "already loaded"),
    ("/load_lora_adapter", {"lora_name": "m", "lora_path": "/nowhere"}, 400, "base model's name"),
    ("/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/unload_lora_adapter", {"lora_name": "nope"}, 400, "no LoRA adapter named 'nope'"),
])
def test_bad_adapter_requests_are_refused(server, path, body, status, words):
    got, answer = post(server, path, body)
    assert got == status and words in answer["error"]["message"]
    assert server.client.completions.create(model="qv", prompt=PROMPT, max_tokens=2).choices[0].text


@pytest.mark.parametrize("path, key, allowed", [
    ("/v1/completions", "user", True), ("/v1/completions", "admin", False),
    ("/load_lora_adapter", "user", False), ("/load_lora_adapter", "admin", True),
    ("/start_profile", "user", False), ("/stop_profile", "admin", True), ("/health", "nobody", True),
])
def test_routes_that_touch_files_take_the_admin_key(path, key, allowed):
    """With ``--admin-api-key``, adapter loads (they read files) and profiles (they write them)
    take that key and no other; every other route takes the API key."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    check = APIKeyCheck(app, api_key="user", admin_api_key="admin")
    asyncio.run(check({"type": "http", "path": path, "headers": [(b"authorization", f"Bearer {key}".encode())]}, None, send))
    assert (reached == [path]) == allowed
    assert allowed or sent[0]["status"] == 401
