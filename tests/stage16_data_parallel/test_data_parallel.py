"""Stage 16: data-parallel replicas behind one server (a group across nodes: tests/ladder/test_multi_node.py).

The oracles: a single engine (dp=1) for every reply; the same prompts' prefix-cache hits with
one replica, against which cache-aware routing keeps its hits and round-robin loses them. Then the
faults: a replica killed mid-serve.
"""

import concurrent.futures
import json
import os
import random
import signal
import time

import pytest
import torch

from checkpoints import write_adapter
from stage16_data_parallel import Engine
from stage16_data_parallel.__main__ import main
from test_server import Server, http

ASK = dict(max_tokens=8, temperature=0)


def prefix_workload(seed: int = 0) -> list[list[int]]:
    """Four groups of four prompts, each 64 shared tokens and 8 of its own, shuffled."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, 5000) for _ in range(64)] for _ in range(4)]
    prompts = [prefix + [rng.randrange(10, 5000) for _ in range(8)] for prefix in prefixes for _ in range(4)]
    rng.shuffle(prompts)
    return prompts


def served_hit_rate(server: Server, prompts: list[list[int]]) -> float:
    """Send the prompts one by one (each routed after the one before finished); cached / prompt tokens."""
    cached = total = 0
    for prompt in prompts:
        usage = server.client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0).usage
        cached, total = cached + usage.prompt_tokens_details.cached_tokens, total + usage.prompt_tokens
    return cached / total


@pytest.fixture(scope="module")
def single(checkpoints):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def cache_aware(checkpoints):
    server = Server("stage16_data_parallel", "--model-path", str(checkpoints["dense"]), "--dp-size", "2")
    yield server
    server.stop()


def test_two_replicas_give_one_engines_replies_and_both_serve(cache_aware, single):
    prompts = [[7 + i, 300 + 11 * i, 41, 9 * i + 2] for i in range(6)]
    expected = [out.text for out in single.generate_batch(prompts, **ASK)]
    replies = cache_aware.client.completions.create(model="m", prompt=prompts, **ASK)
    assert [choice.text for choice in sorted(replies.choices, key=lambda c: c.index)] == expected
    streamed = cache_aware.client.completions.create(model="m", prompt=prompts[0], stream=True, **ASK)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected[0]
    metrics = cache_aware.metrics()
    assert metrics['ladder:replica_requests_total{replica="0"}'] > 0
    assert metrics['ladder:replica_requests_total{replica="1"}'] > 0
    assert http("GET", f"{cache_aware.url}/health") == (200, b"")


def test_cache_aware_routing_keeps_the_prefix_hits_round_robin_loses(checkpoints, cache_aware, single):
    prompts = prefix_workload()
    one_engine = [single.generate(p, max_tokens=1) for p in prompts]
    single_rate = sum(o.cached_tokens for o in one_engine) / sum(o.prompt_tokens for o in one_engine)
    aware = served_hit_rate(cache_aware, prompts)
    round_robin = Server("stage16_data_parallel", "--model-path", str(checkpoints["dense"]), "--dp-size", "2",
                         "--load-balance-method", "round_robin")
    try:
        blind = served_hit_rate(round_robin, prompts)
    finally:
        round_robin.stop()
    assert single_rate > 0.5 and aware >= 0.9 * single_rate and blind < aware


def test_a_killed_replica_ends_its_requests_the_server_goes_on_and_the_replica_comes_back(checkpoints, tmp_path):
    """Also adapters: one loaded at run time reaches every replica (the restarted one too), and a
    refused load is answered once."""
    adapter = write_adapter(checkpoints["dense"], tmp_path / "all", ["q_proj", "v_proj"], 4, 8, False, seed=0)
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths={"all": adapter}) as engine:
        expected = [engine.generate([9, 7, i], lora_path="all", **ASK).text for i in range(4)]
    server = Server("stage16_data_parallel", "--model-path", str(checkpoints["dense"]), "--dp-size", "2",
                    "--load-balance-method", "round_robin", "--max-lora-rank", "4", "--lora-target-modules", "all")
    try:
        load = {"lora_name": "all", "lora_path": adapter}
        assert http("POST", f"{server.url}/load_lora_adapter", json.dumps(load).encode())[0] == 200
        streams = [server.client.completions.create(model="m", prompt=[5, 6, 7 + i], max_tokens=400, temperature=0,
                                                    extra_body={"ignore_eos": True}, stream=True) for i in range(2)]
        firsts = [next(iter(stream)) for stream in streams]  # both replicas are generating
        assert all(chunk.choices for chunk in firsts)
        victim = server.engine_processes()[0]
        os.kill(victim, signal.SIGKILL)
        outcomes = []
        for stream in streams:
            try:
                text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
                outcomes.append("finished" if text else "empty")
            except Exception as error:  # noqa: BLE001 - the stream of the dead replica breaks off with an error
                outcomes.append(type(error).__name__)
        assert outcomes.count("finished") == 1, outcomes  # the other replica's request was not disturbed
        deadline = time.monotonic() + 30
        while b"degraded" not in (health := http("GET", f"{server.url}/health"))[1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health[0] == 200 and b"degraded" in health[1]
        for i in range(3):  # every new request goes to a replica that serves
            reply = server.client.completions.create(model="m", prompt=[9, 9, i], **ASK)
            assert reply.choices[0].finish_reason == "length"
        assert server.metrics()['ladder:replica_up{replica="' + str(1 - engine_index(server, victim)) + '"}'] == 1
        deadline = time.monotonic() + 180  # then the dead replica is started again and routed to
        while http("GET", f"{server.url}/health")[1] != b"" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert http("GET", f"{server.url}/health") == (200, b""), server.output()
        assert len(server.engine_processes()) == 2 and victim not in server.engine_processes()
        served = server.metrics()
        for i in range(4):  # round robin: both replicas answer
            reply = server.client.completions.create(model="m", prompt=[9, 8, i], **ASK)
            assert reply.choices[0].finish_reason == "length"
        after = server.metrics()
        assert all(after[f'ladder:replica_requests_total{{replica="{r}"}}'] > served[f'ladder:replica_requests_total{{replica="{r}"}}']
                   for r in "01")
        assert "engine replica" in server.output() and "serving again" in server.output()
        got = [server.client.completions.create(model="all", prompt=[9, 7, i], **ASK).choices[0].text for i in range(4)]
        assert got == expected  # round robin: both replicas, the restarted one included, serve the adapter
        status, body = http("POST", f"{server.url}/load_lora_adapter", json.dumps(dict(load, lora_name="x",
                                                                                         lora_path="/nowhere")).encode())
        assert status == 400 and b"adapter_config.json" in body
    finally:
        server.stop()


def test_a_hung_replica_is_killed_and_its_unanswered_requests_go_to_the_other(checkpoints):
    """A replica that stops answering (SIGSTOP) with work in hand is killed after --dist-timeout:
    its streaming request ends with an error, and a request it never answered runs elsewhere.
    Silence while idle is no hang: a replica idle for longer than --dist-timeout, slow to answer
    its next request, is left alone."""
    server = Server("stage16_data_parallel", "--model-path", str(checkpoints["dense"]), "--dp-size", "2",
                    "--load-balance-method", "round_robin", "--dist-timeout", "3")
    try:
        replica_0, replica_1 = sorted(server.engine_processes())  # replica 0 started first
        time.sleep(3.5)  # both idle for longer than --dist-timeout
        os.kill(replica_0, signal.SIGSTOP)  # slow to answer its next request: 1.5 s, within the timeout
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(server.client.completions.create, model="m", prompt=[5, 6], **ASK)  # replica 0
            time.sleep(1.5)
            os.kill(replica_0, signal.SIGCONT)
            assert slow.result().choices[0].finish_reason == "length"
        assert b"degraded" not in http("GET", f"{server.url}/health")[1]

        first = server.client.completions.create(model="m", prompt=[5, 6, 7], max_tokens=400, temperature=0,
                                                 extra_body={"ignore_eos": True}, stream=True)  # replica 1
        assert next(iter(first)).choices
        busy = server.client.completions.create(model="m", prompt=[8, 9], max_tokens=400, temperature=0,
                                                extra_body={"ignore_eos": True}, stream=True)  # replica 0
        assert next(iter(busy)).choices
        os.kill(replica_1, signal.SIGSTOP)
        late = server.client.completions.create(model="m", prompt=[11, 12], **ASK)  # routed to 1, answered by 0
        assert late.choices[0].finish_reason == "length"
        with pytest.raises(Exception):  # noqa: B017 - the hung replica's stream breaks off with an error event
            "".join(chunk.choices[0].text for chunk in first if chunk.choices)
        assert b"degraded: replicas [1]" in http("GET", f"{server.url}/health")[1]
        assert "".join(chunk.choices[0].text for chunk in busy if chunk.choices)
    finally:
        server.stop()


def test_a_replica_busy_with_a_long_step_is_not_taken_for_hung(builtin_folder):
    """Slow is not dead: a prefill step longer than --dist-timeout (800 tokens of the built-in model
    on one CPU thread) leaves the replica's heartbeat counting, so the watchdog lets it finish."""
    server = Server("stage16_data_parallel", "--dist-timeout", "1", "--context-length", "1024",
                    "--chunked-prefill-size", "-1")
    try:
        began = time.monotonic()
        reply = server.client.completions.create(model="m", prompt=[100 + i for i in range(800)], **ASK)
        took = time.monotonic() - began
        assert reply.choices[0].finish_reason == "length"
        assert http("GET", f"{server.url}/health") == (200, b"")
        assert "heartbeat stopped" not in server.output()
        if took < 3:  # the step was not long enough to show anything on this machine
            pytest.skip(f"the request took {took:.1f} s, not much longer than the 1 s timeout")
    finally:
        server.stop()


def engine_index(server: Server, pid: int) -> int:
    """Which replica the killed process was (replica 0 was started first: the lower pid)."""
    return 0 if all(pid <= other for other in server.engine_processes() + [pid]) else 1


@pytest.mark.parametrize("flags, message", [
    (["--dp-size", "0", "--serve"], "dp_size=0 must be a positive integer"),
    (["p", "--dp-size", "2"], "add --serve"),
    (["p", "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "nohost"], "HOST:PORT"),
    (["p", "--tp-size", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "out of range"),
    (["p", "--nnodes", "2", "--dist-init-addr", "h:1"], "must divide"),
    (["--tp-size", "2", "--nnodes", "2", "--node-rank", "1"], "HOST:PORT"),
    (["p", "--gpu-id-step", "-1"], "gpu_id_step=-1 must be an integer of at least 0"),
])
def test_bad_flags_exit_with_status_2_and_start_nothing(flags, message, capsys):
    try:
        status = main(flags + ["--device", "cpu"])
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    assert status == 2 and message in capsys.readouterr().err


def test_gpu_id_step_places_replicas_and_zero_lets_them_share_one_gpu(monkeypatch):
    """SGLang's placement: replica r's ranks from GPU base + r x ranks x step on. Checked before anything
    starts, with torch told of CUDA devices that this machine does not have."""
    from stage16_data_parallel import engine_args
    from stage16_data_parallel.__main__ import check_replica_devices
    from stage16_data_parallel.data_parallel_controller import replica_gpus
    from stage16_data_parallel.engine_args import multi_node_settings

    kwargs = dict(tp_size=2, ep_size=1, nnodes=1, base_gpu_id=1, gpu_id_step=1, kv_cache_bytes=None, device="cuda")
    assert [replica_gpus(kwargs, r) for r in range(3)] == [[1, 2], [3, 4], [5, 6]]
    assert [replica_gpus(dict(kwargs, gpu_id_step=0, tp_size=1), r) for r in range(3)] == [[1], [1], [1]]
    assert [replica_gpus(dict(kwargs, gpu_id_step=2), r) for r in range(2)] == [[1, 3], [5, 7]]

    cuda = torch.device("cuda")
    monkeypatch.setattr(engine_args, "resolve_device", lambda device: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_replica_devices(dict(kwargs, base_gpu_id=0), 2)  # GPUs 0..3: fits
    with pytest.raises(ValueError, match=r"need GPUs 1 \.\. 4, but torch sees 4 \(--gpu-id-step 0 lets"):
        check_replica_devices(kwargs, 2)
    one = dict(kwargs, tp_size=1, base_gpu_id=0, gpu_id_step=0)
    with pytest.raises(ValueError, match="give --kv-cache-bytes"):
        check_replica_devices(one, 4)
    check_replica_devices(dict(one, kv_cache_bytes=2**30), 4)  # four replicas, one GPU, a pool each
    with pytest.raises(ValueError, match="NCCL needs a GPU per rank"):
        multi_node_settings(1, 0, None, 2, cuda, None, 0, gpu_id_step=0)
    assert multi_node_settings(1, 0, None, 2, cuda, None, 1, gpu_id_step=2) == 2  # GPUs 1 and 3
    with pytest.raises(ValueError, match="need GPU 5"):
        multi_node_settings(1, 0, None, 2, cuda, None, 1, gpu_id_step=4)
