"""Stage 18 through HTTP: a router in front of a prefill server and a decode server.

The oracle is stage 17 in-process on the same checkpoint (greedy text): the
official openai client against the router must get it back, plain, streamed
and as chat.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from checkpoints import write_adapter
from conftest import ROOT
from stage17_hicache import Engine as Stage17
from test_server import Server, http

STAGE = "stage18_pd_disaggregation"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    """A router, a prefill server and a decode server, both serving the base model and adapter "a"."""
    model = str(checkpoints["dense"])
    adapter = write_adapter(checkpoints["dense"], tmp_path_factory.mktemp("adapter") / "a", ["q_proj", "v_proj"], 4, 8,
                            False, seed=0)
    bootstrap = free_port()
    both = ("--model-path", model, "--lora-paths", f"a={adapter}")
    prefill = Server(STAGE, *both, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap))
    decode = Server(STAGE, *both, "--disaggregation-mode", "decode")
    router = Router([(prefill.url, bootstrap)], [decode.url])
    yield (model, adapter), router, prefill, decode
    router.stop()
    prefill.stop()
    decode.stop()


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
