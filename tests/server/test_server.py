"""Stage 11: a real server process on 127.0.0.1, driven by the official ``openai`` client.

The server runs the built-in model on the CPU. Its answers are checked
against stage 10's engine in this process: same prompt, same settings,
same text. Then the server's own promises: streams equal plain responses,
concurrent streams do not mix, a client that disconnects frees its pages,
bad requests get 400 and a full queue 503, and the server keeps serving.
"""

import asyncio
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import ROOT, SERVER_STAGES
from test_bad_input import ANY_VALUE  # the Python API's random inputs
from test_bad_input import PARAMS as RANDOM_PARAMS
from test_bad_input import PROMPTS as RANDOM_PROMPTS

CONTEXT = 256  # small, so a too-long prompt is cheap to send
LONG_ANSWER = CONTEXT - 16  # max_tokens of a request that runs for seconds (prompt + max_tokens must fit the context)
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are"]
STARTUP_TIMEOUT_S = 180


@pytest.fixture(scope="module", params=SERVER_STAGES)
def server_stage(request) -> str:
    """Each stage that serves HTTP (which tests run for which: tests/conftest.py)."""
    return request.param


def http(method: str, url: str, body: bytes | None = None, timeout: float = 30,
         headers: dict | None = None) -> tuple[int, bytes]:
    """One plain HTTP request (stdlib only): its status and body, error statuses included."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``python -m STAGE --serve`` in a subprocess, on a free port. ``wait=False`` returns once the
    process is started (several servers then start side by side); ``wait_until_healthy`` waits."""

    def __init__(self, stage: str, *flags: str, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{stage}-server-{self.port}.log"
        self.log = open(log_path, "w+")  # noqa: SIM115 - open while the server runs; the test process ends with it
        self.process = subprocess.Popen(
            [sys.executable, "-m", stage, "--serve", "--port", str(self.port), "--device", "cpu",
             "--served-model-name", "m", *flags],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()
        if wait:
            self.wait_until_healthy()

    def wait_until_healthy(self) -> "Server":
        deadline = self.started + STARTUP_TIMEOUT_S
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.output()}")
            time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)
        return self

    def _healthy(self) -> bool:
        try:
            return http("GET", f"{self.url}/health", timeout=2)[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as ``{"name{labels}": value}``."""
        text = http("GET", f"{self.url}/metrics")[1].decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}

    def wait_for_metrics(self, check, timeout=30.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while not check(samples := self.metrics()):
            assert time.monotonic() < deadline, f"metrics never satisfied the check: {samples}"
            time.sleep(0.2)
        return samples

    def processes(self) -> list[int]:
        """Every process below the server: its engine processes and whatever they and
        multiprocessing started (the forkserver, the resource tracker, worker ranks)."""
        return descendants(self.process.pid)

    def engine_processes(self) -> list[int]:
        """The server's engine processes (its replicas from stage 16): forked by the
        multiprocessing forkserver the server started (common/processes.py)."""
        servers = [pid for pid in children(self.process.pid) if b"forkserver" in command_line(pid)]
        return [pid for server in servers for pid in children(server)]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def children(pid: int) -> list[int]:
    """The process's children (Linux /proc; any of its threads may have started one)."""
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in listing.read_text().split()]
        except OSError:  # the thread or the process has just ended
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Its children, theirs, and so on."""
    found, todo = [], children(pid)
    while todo:
        found.append(todo.pop())
        todo += children(found[-1])
    return found


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def server(server_stage, builtin_folder):
    server = Server(server_stage, "--context-length", str(CONTEXT))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(server_stage, builtin_folder):
    """The same stage's engine in this process: what the server must answer."""
    with importlib.import_module(server_stage).Engine(device="cpu", context_length=CONTEXT) as engine:
        yield engine


def idle(samples) -> bool:
    return samples["ladder:num_running_reqs"] == 0 and samples["ladder:kv_pages_used"] == 0


# ----- answers ----------------------------------------------------------------------------


@pytest.mark.every_serving_stage
def test_health_and_models_list_the_served_model(server):
    assert http("GET", f"{server.url}/health")[0] == 200
    (model,) = server.client.models.list().data
    assert model.id and model.max_model_len == CONTEXT


@pytest.mark.every_serving_stage
def test_completion_equals_the_engine_in_process(server, reference):
    response = server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = reference.generate(PROMPTS[0], max_tokens=12, temperature=0)
    (choice,) = response.choices
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens


def test_token_id_prompt_equals_text_prompt(server, reference):
    ids = reference.tokenizer.encode(PROMPTS[1])
    by_ids = server.client.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0)
    by_text = server.client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_completion_applies_the_chat_template(server, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    response = server.client.chat.completions.create(model="m", messages=messages, max_completion_tokens=16, temperature=0)
    prompt = reference.tokenizer.apply_chat_template(messages)
    expected = reference.generate(prompt, max_tokens=16, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert "Paris" in expected.text


def test_stop_string_ends_the_text_before_it(server, reference):
    response = server.client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[":"])
    expected = reference.generate(PROMPTS[2], max_tokens=40, temperature=0, stop=[":"])
    assert response.choices[0].text == expected.text and ":" not in expected.text
    assert response.choices[0].finish_reason == "stop"


def test_seeded_choices_reproduce_and_count_the_prompt_once(server):
    ask = dict(model="m", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, seed=7, n=3)
    first, second = server.client.completions.create(**ask), server.client.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # choice i draws with seed + i
    single = server.client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=1)
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    assert first.usage.completion_tokens == 30


# ----- streaming ----------------------------------------------------------------------------


def test_completion_stream_equals_plain_response(server):
    ask = dict(model="m", prompt=PROMPTS[3], max_tokens=20, temperature=0)
    plain = server.client.completions.create(**ask)
    chunks = list(server.client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # it really came in pieces


@pytest.mark.every_serving_stage
def test_chat_stream_equals_plain_response(server):
    ask = dict(model="m", messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=20, temperature=0)
    plain = server.client.chat.completions.create(**ask)
    chunks = list(server.client.chat.completions.create(**ask, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_sixteen_concurrent_streams_each_get_their_own_text(server):
    expected = {p: server.client.completions.create(model="m", prompt=p, max_tokens=12, temperature=0).choices[0].text for p in PROMPTS}
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

    async def stream(prompt):
        chunks = await client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return prompt, "".join([c.choices[0].text async for c in chunks])

    async def all_streams():
        async with client:
            return await asyncio.gather(*(stream(PROMPTS[i % 4]) for i in range(16)))

    results = asyncio.run(all_streams())
    assert len(results) == 16 and all(text == expected[prompt] for prompt, text in results)
    server.wait_for_metrics(idle)


# ----- clients that go away -------------------------------------------------------------------


def abort_count(samples) -> float:
    return samples.get('ladder:num_requests_total{finish_reason="abort"}', 0.0)


@pytest.mark.every_serving_stage
def test_stream_disconnect_aborts_the_request_and_frees_its_pages(server):
    before = server.metrics()
    body = {"prompt": PROMPTS[0], "max_tokens": LONG_ANSWER, "temperature": 0, "ignore_eos": True, "stream": True}
    connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: {")  # the stream has begun
    busy = server.metrics()
    assert busy["ladder:num_running_reqs"] == 1 and busy["ladder:kv_pages_used"] > 0
    connection.close()  # the client goes away long before LONG_ANSWER tokens
    samples = server.wait_for_metrics(lambda s: idle(s) and abort_count(s) == abort_count(before) + 1)
    assert samples["ladder:generation_tokens_total"] - before["ladder:generation_tokens_total"] < LONG_ANSWER


def test_plain_request_disconnect_aborts_too(server):
    before = abort_count(server.metrics())
    body = {"prompt": PROMPTS[0], "max_tokens": LONG_ANSWER, "temperature": 0, "ignore_eos": True}
    with pytest.raises(TimeoutError):
        http("POST", f"{server.url}/v1/completions", json.dumps(body).encode(), timeout=1.5)
    server.wait_for_metrics(lambda s: idle(s) and abort_count(s) == before + 1)


# ----- bad requests ---------------------------------------------------------------------------

BAD_BODIES = {
    "malformed JSON": b'{"prompt": "hi", "max_tokens": ',
    "not an object": b'["hi"]',
    "prompt missing": b'{"max_tokens": 5}',
    "temperature is text": b'{"prompt": "hi", "temperature": "hot"}',
    "max_tokens is a float": b'{"prompt": "hi", "max_tokens": 2.5}',
    "negative temperature": b'{"prompt": "hi", "temperature": -1}',
    "top_p zero": b'{"prompt": "hi", "top_p": 0}',
    "negative max_tokens": b'{"prompt": "hi", "max_tokens": -3}',
    "presence_penalty out of range": b'{"prompt": "hi", "presence_penalty": 5}',
    "n zero": b'{"prompt": "hi", "n": 0}',
    "empty prompt": b'{"prompt": ""}',
    "token id outside the vocabulary": b'{"prompt": [1, 99999999]}',
    "prompt longer than the context": json.dumps({"prompt": "hello " * (CONTEXT + 10)}).encode(),
    "logprobs beyond 20": b'{"prompt": "hi", "logprobs": 21}',
    "an unimplemented field": b'{"prompt": "hi", "best_of": 2}',
}


@pytest.mark.every_serving_stage
@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_completion_request_gets_400_with_an_openai_error(server, case):
    status, body = http("POST", f"{server.url}/v1/completions", BAD_BODIES[case])
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400 and error["message"]


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 5}]])
def test_bad_chat_request_gets_400(server, messages):
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="m", messages=messages, max_tokens=4)


def test_too_long_prompt_error_names_the_context(server):
    with pytest.raises(openai.BadRequestError, match=f"context is {CONTEXT}"):
        server.client.completions.create(model="m", prompt="hello " * (CONTEXT + 10), max_tokens=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(
    st.builds(lambda prompt, params: {"prompt": prompt, **params}, RANDOM_PROMPTS, RANDOM_PARAMS),
    st.builds(lambda content, params: {"messages": [{"role": "user", "content": content}], **params}, RANDOM_PROMPTS, RANDOM_PARAMS),
    ANY_VALUE,
))
def test_random_bodies_get_200_or_a_400_error_never_a_crash(server, body):
    """Random JSON (the Python API's random values, as OpenAI fields) is answered or refused, nothing else."""
    if isinstance(body, dict):
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 4:
            body["max_tokens"] = 4  # a long answer is valid, just slow here
        body.pop("stream", None)
    route = "chat/completions" if isinstance(body, dict) and "messages" in body else "completions"
    status, answer = http("POST", f"{server.url}/v1/{route}", json.dumps(body).encode())
    event(f"{route}: {status}")
    assert status in (200, 400), (status, answer)
    if status == 400:
        error = json.loads(answer)["error"]
        assert error["type"] == "invalid_request_error" and error["message"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(2, 20_000), field=st.sampled_from(["prompt", "stop", "messages", "logit_bias", "n"]))
def test_deeply_nested_bodies_get_a_400_never_a_crash(server, depth, field):
    """A field nested up to 20,000 lists deep is refused (the JSON parser bounds its depth), not a 500.
    The body is written as text: Python's own json module cannot encode it that deep."""
    route = "chat/completions" if field == "messages" else "completions"
    value = "[" * depth + '"x"' + "]" * depth
    body = f'{{"model": "m", "prompt": "hi", "max_tokens": 1, "{field}": {value}}}'
    status, answer = http("POST", f"{server.url}/v1/{route}", body.encode())
    assert status == 400 and json.loads(answer)["error"]["type"] == "invalid_request_error", (depth, field, answer[:200])


def test_a_profile_of_the_engines_steps_is_written_where_asked(server, tmp_path):
    """SGLang's /start_profile and /stop_profile: the engine's steps between them land in a Chrome
    trace in the folder asked for; one profile at a time, and a stop with none running is a 400."""
    status, body = http("POST", f"{server.url}/start_profile", json.dumps({"output_dir": str(tmp_path)}).encode())
    assert status == 200, body
    assert http("POST", f"{server.url}/start_profile", b"")[0] == 400  # one is running
    server.client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=3, temperature=0)
    status, body = http("POST", f"{server.url}/stop_profile")
    assert status == 200, body
    trace = Path(json.loads(body)["trace"])
    assert trace.parent == tmp_path
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(event.get("name", "").startswith("aten::") for event in events)  # the model's ops ran under it
    assert http("POST", f"{server.url}/stop_profile")[0] == 400
    assert http("POST", f"{server.url}/start_profile", b'{"num_steps": 0}')[0] == 400


def test_a_counted_profile_ends_by_itself(server, tmp_path):
    body = json.dumps({"output_dir": str(tmp_path), "num_steps": 2}).encode()
    assert http("POST", f"{server.url}/start_profile", body)[0] == 200
    server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert len(list(tmp_path.glob("*.trace.json"))) == 1
    assert http("POST", f"{server.url}/stop_profile")[0] == 400  # it stopped after its two steps


def test_server_still_serves_after_bad_requests(server, reference):
    for body in BAD_BODIES.values():  # (the random bodies above ran before this too)
        http("POST", f"{server.url}/v1/completions", body)
    response = server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert response.choices[0].text == reference.generate(PROMPTS[0], max_tokens=6, temperature=0).text
    server.wait_for_metrics(idle)


# ----- a full queue, and shutdown ---------------------------------------------------------------


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_full_queue_gets_503_then_serves_and_shuts_down_cleanly(server_stage, builtin_folder):
    # One waiting request at most, and prompts prefilled 16 tokens a step: a burst must overflow.
    server = Server(server_stage, "--max-queued-requests", "1", "--chunked-prefill-size", "16", "--context-length", str(CONTEXT))
    try:
        body = json.dumps({"prompt": "The history of the printing press " * 12, "max_tokens": 4, "temperature": 0}).encode()
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: http("POST", f"{server.url}/v1/completions", body, timeout=120), range(12)))
        statuses = [status for status, _ in responses]
        assert set(statuses) == {200, 503}, statuses
        refused = json.loads(next(body for status, body in responses if status == 503))["error"]
        assert refused["code"] == 503 and "max-queued-requests" in refused["message"]
        assert server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=3, temperature=0).choices[0].text
        processes = server.processes()
        assert server.engine_processes(), "the engine runs in a process of its own"
    finally:
        returncode = server.stop()
    assert returncode in (0, -signal.SIGTERM), f"exit code {returncode}:\n{server.output()}"  # not killed
    # Its processes (the engine, multiprocessing's forkserver and resource tracker) exit once the server has: allow them
    # a few seconds on a loaded machine, then none may be left running.
    deadline = time.monotonic() + 15
    while (left := [pid for pid in processes if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


# ----- the command line ---------------------------------------------------------------------------


@pytest.mark.every_serving_stage
def test_command_line_needs_a_prompt_or_serve(server_stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"{server_stage}.__main__").main([])
    assert exit_info.value.code == 2
    assert "--serve" in capsys.readouterr().err


def test_bad_model_path_fails_at_start_with_a_clear_error(server_stage, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", server_stage, "--serve", "--model-path", str(tmp_path / "missing"), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2 and re.search(r"error: the engine could not start: .*missing", result.stderr), result.stderr


# ----- the engine's counts behind /metrics -------------------------------------------------------


def test_engine_stats_count_requests_pages_and_tokens(server_stage, engine_for):
    engine = engine_for(server_stage, "dense")
    before = engine.stats()["generated_tokens"]
    rid = engine.add_request(list(range(3, 40)), max_tokens=5, temperature=0, ignore_eos=True)
    engine.step()
    busy = engine.stats()
    assert busy["running"] == 1 and busy["pages_used"] > 0
    while engine.get_output(rid) is None:
        engine.step()
    stats = engine.stats()
    assert stats["generated_tokens"] - before == 5
    assert stats["running"] == stats["waiting"] == stats["pages_used"] == 0
    assert stats["pages_cached"] > 0  # the finished request's pages went to the prefix cache


def test_a_step_out_of_memory_reaches_the_front_end_as_a_500_with_the_reason(server_stage, checkpoints, monkeypatch):
    """The engine loop turns a request stopped by a failed step into an error update (status 500,
    the engine's message), which the front end answers as an OpenAI error; the next request is served."""
    from common.sampling import SamplingParams
    from test_out_of_memory import LONG, SHORT, little_memory

    engine_process = importlib.import_module(f"{server_stage}.engine_process")
    EngineLoop, GenerateRequest, RequestUpdate = engine_process.EngineLoop, engine_process.GenerateRequest, engine_process.RequestUpdate
    with importlib.import_module(server_stage).Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        model = engine.runner.model
        monkeypatch.setattr(model, "forward", little_memory(engine, model.forward))
        loop = EngineLoop(engine, conn=None, max_queued_requests=None)

        def serve(rid: str, prompt: list[int]) -> RequestUpdate:
            assert loop.handle(GenerateRequest(rid, prompt, SamplingParams(max_tokens=3, temperature=0))) == [RequestUpdate(rid)]
            finished = []
            while loop.live:
                finished += [u for u in loop.step() if u.output is not None]
            return finished[0]

        failed = serve("long", LONG)
        assert failed.status == 500 and failed.output.finish_reason == "abort"
        assert "ran out of device memory" in failed.error and "chunked_prefill_size" in failed.error
        served = serve("short", SHORT)
        assert served.error is None and served.status == 200 and served.output.completion_tokens == 3
