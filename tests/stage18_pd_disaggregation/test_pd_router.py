"""Stage 18 through HTTP: a router in front of prefill servers A and B and decode server D.

The oracle is stage 17 in-process on the same checkpoint (greedy text): the
official openai client against the router must get it back, plain, streamed,
as chat, structured and with an adapter. Then the faults, on the same cluster
(every handover timeout 3 s), in file order, each test leaving it as the next
expects: a client that goes away mid-handover; B hung (its engine stopped),
then resumed; then B killed (routed around) and D killed (its stream ends with
an error). The books are each server's /metrics: no page used, no handover
queued, nothing held for a decode server.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import openai
import pytest

from checkpoints import write_adapter
from conftest import ROOT
from stage17_hicache import Engine as Stage17
from test_server import Server, free_port, http

STAGE = "stage18_pd_disaggregation"
TIMEOUT = "3"  # seconds a handover may take
PROMPT = "Once upon a time"


class Router:
    """``python -m stage18_pd_disaggregation --pd-router ...`` in a subprocess."""

    def __init__(self, prefill: list[tuple[str, int]], decode: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"pd-router-{self.port}.log", "w+")  # noqa: SIM115
        prefill_args = [str(x) for url, port in prefill for x in (url, port)]
        self.process = subprocess.Popen([sys.executable, "-m", STAGE, "--pd-router", "--prefill", *prefill_args,
                                         "--decode", *decode, "--port", str(self.port)],
                                        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if http("GET", f"{self.url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"the router did not start:\n{self.log.read()}")
            time.sleep(0.3)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    """A router, prefill servers A and B and decode server D, all serving the base model and adapter "a"."""
    model = str(checkpoints["dense"])
    adapter = write_adapter(checkpoints["dense"], tmp_path_factory.mktemp("adapter") / "a", ["q_proj", "v_proj"], 4, 8,
                            False, seed=0)
    ports = [free_port(), free_port()]
    both = ("--model-path", model, "--lora-paths", f"a={adapter}", "--disaggregation-timeout", TIMEOUT)
    prefills = [Server(STAGE, *both, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port),
                       wait=False) for port in ports]
    decode = Server(STAGE, *both, "--disaggregation-mode", "decode", wait=False)
    for server in (*prefills, decode):  # (started side by side: each start is seconds of imports)
        server.wait_until_healthy()
    router = Router([(p.url, port) for p, port in zip(prefills, ports)], [decode.url])
    yield (model, adapter), router, prefills, decode
    router.stop()
    for server in (*prefills, decode):
        if server.process.poll() is None:
            signal_engine(server, signal.SIGCONT)
        server.stop()


def test_the_router_serves_stage17s_text_plain_streamed_and_chat(cluster):
    (model, _), router, _, _ = cluster
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    with Stage17(model_path=model, device="cpu") as alone:
        expected = [alone.generate(p, max_tokens=10, temperature=0, ignore_eos=True).text for p in prompts]
        chat_prompt = alone.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
        chat_expected = alone.generate(chat_prompt, max_tokens=8, temperature=0, ignore_eos=True).text
    client = router.client
    for prompt, text in zip(prompts, expected):
        reply = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text == text
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == chat_expected
    # SGLang's native endpoint crosses the handover too (lang's RuntimeEndpoint reads /get_model_info).
    status, body = http("POST", f"{router.url}/generate", json.dumps(
        {"text": prompts, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}).encode())
    assert status == 200 and [answer["text"] for answer in json.loads(body)] == expected
    assert "tokenizer_path" in json.loads(http("GET", f"{router.url}/get_model_info")[1])
    assert http("GET", f"{router.url}/health")[0] == 200


def test_structured_and_lora_requests_cross_the_handover(cluster):
    (model, adapter), router, _, _ = cluster
    with Stage17(model_path=model, device="cpu", lora_paths={"a": str(adapter)}) as alone:
        structured = alone.generate("Answer:", max_tokens=12, temperature=0, regex=r"(yes|no)[.!]").text
        adapted = alone.generate("Once upon a time", max_tokens=10, temperature=0, ignore_eos=True, lora_path="a").text
    reply = router.client.completions.create(model="m", prompt="Answer:", max_tokens=12, temperature=0,
                                             extra_body={"regex": r"(yes|no)[.!]"})
    assert reply.choices[0].text == structured
    reply = router.client.completions.create(model="a", prompt="Once upon a time", max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert reply.choices[0].text == adapted


def test_log_probabilities_are_refused_with_a_reason(cluster):
    _, router, _, _ = cluster
    with pytest.raises(openai.BadRequestError, match="not handed over"):
        router.client.completions.create(model="m", prompt="Hi", max_tokens=3, logprobs=2)


# ----- faults (in this order, on the same cluster) -----------------------------------------------------


def idle(samples: dict) -> bool:
    """A server with nothing running, queued, handed over or held, and no page used."""
    return all(samples.get(name, 0) == 0 for name in (
        "ladder:num_running_reqs", "ladder:num_queue_reqs", "ladder:kv_pages_used",
        "ladder:num_decode_prealloc_queue_reqs", "ladder:num_decode_transfer_queue_reqs",
        "ladder:num_prefill_inflight_queue_reqs"))


def complete(router, prompt=PROMPT, max_tokens=6, timeout=60):
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    status, content = http("POST", f"{router.url}/v1/completions", json.dumps(body).encode(), timeout=timeout)
    return status, json.loads(content)


def signal_engine(server: Server, sig: int) -> None:
    for pid in server.engine_processes():
        os.kill(pid, sig)


def test_a_client_that_goes_away_mid_handover_frees_both_sides(cluster):
    _, router, prefills, decode = cluster
    for server in prefills:  # nobody computes the prompt: the handover stays in transferring
        signal_engine(server, signal.SIGSTOP)
    connection = HTTPConnection("127.0.0.1", router.port, timeout=30)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 4}
    threading.Thread(target=lambda: connection.request("POST", "/v1/completions", json.dumps(body).encode(),
                                                       {"Content-Type": "application/json"})).start()
    decode.wait_for_metrics(lambda m: m["ladder:num_decode_transfer_queue_reqs"] == 1, timeout=10)
    connection.sock.close()  # the client goes away
    decode.wait_for_metrics(idle, timeout=10)
    for server in prefills:
        signal_engine(server, signal.SIGCONT)
    for server in prefills:
        server.wait_for_metrics(idle, timeout=15)


def test_a_hung_prefill_server_fails_its_request_in_time_and_is_left_out(cluster):
    _, router, (_, hung), decode = cluster
    status, reply = complete(router)
    assert status == 200
    text, failed_before = reply["choices"][0]["text"], decode.metrics()['ladder:handovers{state="failed"}']
    signal_engine(hung, signal.SIGSTOP)
    try:
        answers = [complete(router) for _ in range(2)]  # round robin: one of them goes to the hung server
        failed = [reply for status, reply in answers if status != 200]
        assert len(failed) == 1 and "no K/V arrived" in failed[0]["error"]["message"]
        status, health = http("GET", f"{router.url}/health")
        assert json.loads(health) == {"status": "degraded", "down": [hung.url]}
        for _ in range(2):  # the hung server is left out
            status, reply = complete(router)
            assert status == 200 and reply["choices"][0]["text"] == text
        decode.wait_for_metrics(idle, timeout=10)
    finally:
        signal_engine(hung, signal.SIGCONT)
    hung.wait_for_metrics(idle, timeout=15)
    assert decode.metrics()['ladder:handovers{state="failed"}'] == failed_before + 1


def test_killed_servers_are_routed_around_or_end_their_requests_with_an_error(cluster):
    _, router, (alive, killed), decode = cluster
    status, reply = complete(router)
    text = reply["choices"][0]["text"]
    for pid in killed.engine_processes() + [killed.process.pid]:
        os.kill(pid, signal.SIGKILL)
    time.sleep(5.5)  # past the router's retry delay for the hung server of the test before
    for _ in range(3):  # each request that picks the killed server is tried again on the other
        status, reply = complete(router)
        assert status == 200 and reply["choices"][0]["text"] == text
    assert killed.url in json.loads(http("GET", f"{router.url}/health")[1])["down"]
    # The decode server dies mid-stream: the stream ends with an error event; the prefill side holds nothing.
    connection = HTTPConnection("127.0.0.1", router.port, timeout=30)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    for pid in decode.engine_processes() + [decode.process.pid]:
        os.kill(pid, signal.SIGKILL)
    lines = response.read().decode().split("\n\n")
    assert "decode server" in lines[-2] and '"error"' in lines[-2], lines[-3:]
    status, reply = complete(router)
    assert status == 503 and "no prefill/decode pair" in reply["error"]["message"]
    alive.wait_for_metrics(idle, timeout=10)
