"""The benchmark harness runs end to end on a tiny workload (its figures are not asserted)."""

import argparse
import json

import pytest
import torch

from benchmarks.systems import run_system
from benchmarks.workloads import Workload, make_workload
from common.config import ModelConfig
from common.loader import resolve_model_path
from conftest import SERVER_STAGES, STAGES


def tiny_workload() -> Workload:
    return Workload("tiny", "3 short requests", [[5, 6, 7], [8] * 12, [9, 10]], [4, 2, 6])


@pytest.mark.parametrize("system", STAGES + ["hf-generate", "hf-continuous-batching"])
def test_every_stage_and_hf_generate_run_a_workload(system, checkpoints):
    folder = checkpoints["dense"]
    result = run_system(system, str(folder), folder, tiny_workload(), "cpu")
    assert result["output_tokens"] == 12 and result["output_tokens_per_s"] > 0


def test_workloads_are_seeded():
    a, b = make_workload("random", "cpu", 1000, seed=1), make_workload("random", "cpu", 1000, seed=1)
    assert a.prompts == b.prompts and a.max_tokens == b.max_tokens
    assert len(make_workload("random", "gpu", 1000).prompts) == 256


def test_kv_memory_report_runs(checkpoints, capsys):
    from benchmarks import kv_memory

    kv_memory.main(["--model", str(checkpoints["dense"])])
    report = capsys.readouterr().out
    assert "stage02_peak_bytes_in_use" in report and "stage04_batching" in report


def test_one_stage_with_different_options_side_by_side(checkpoints):
    folder = checkpoints["dense"]
    result = run_system("stage06_scheduling@schedule_policy=lpm", str(folder), folder, tiny_workload(), "cpu")
    assert result["system"] == "stage06_scheduling@schedule_policy=lpm" and result["output_tokens"] == 12


def test_random_checkpoints_use_hub_names_and_load(tmp_path, monkeypatch):
    """The GPU box's random checkpoints must look like hub ones: separate q/k/v and gate/up."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from benchmarks import checkpoints
    from common.loader import load_model

    tiny = dict(checkpoints.QWEN3_BASE, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    monkeypatch.setitem(checkpoints.SHAPES, "tiny", tiny)
    folder = checkpoints.random_checkpoint("tiny", root=tmp_path)
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.self_attn.k_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    model, _, _ = load_model(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(model(ids[0], torch.arange(3), _full_attention))[-1],
                                   reference(ids).logits[0, -1], rtol=1e-4, atol=1e-4)


def _full_attention(layer_index, q, k, v):
    from common.attention import causal_attention

    return causal_attention(q, k, v)


def test_online_serving_benchmark_drives_a_server(checkpoints, tmp_path):
    """Both clients (the official one from two processes, and the raw one) against one server."""
    import socket

    from benchmarks import serving

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vocab_size = ModelConfig.from_file(checkpoints["dense"]).vocab_size
    expected_tokens = sum(make_workload("random", "cpu", vocab_size).max_tokens[:3])
    server = serving.LocalServer(str(checkpoints["dense"]), "cpu", port, [])
    try:
        for client, processes in (("openai", "2"), ("raw", "1")):
            out, requests_out = tmp_path / f"{client}.json", tmp_path / f"{client}-requests.json"
            serving.main(["--url", server.url, "--requests", "3", "--request-rate", "20", "--client", client,
                          "--client-processes", processes, "--out", str(out), "--requests-out", str(requests_out)])
            (result,) = json.loads(out.read_text())["results"]
            assert result["requests"] == 3 and result["output_tokens"] == expected_tokens
            assert result["client_processes"] == int(processes) and result["client"] == client
            assert result["ttft_median_ms"] > 0 and result["itl_median_ms"] > 0
            timings = json.loads(requests_out.read_text())
            assert sorted(r["tokens"] for r in timings) == sorted(make_workload("random", "cpu", vocab_size).max_tokens[:3])
            for r in timings:
                assert r["start"] >= 0 and r["stamps"] == sorted(r["stamps"]) and r["stamps"][0] > r["start"]
                if client == "raw":  # it also times the connection and the status line
                    assert r["start"] <= r["connected"] <= r["answered"] <= r["stamps"][0]
    finally:
        server.stop()


def test_random_checkpoints_give_every_id_text(tmp_path, monkeypatch):
    """A random model samples every id of Qwen3's vocabulary; each must decode to text, or a served
    stream would send nothing for it (and its time to first token would wait for one that has text)."""
    from benchmarks import checkpoints
    from common.tokenizer import Tokenizer

    builtin = Tokenizer(resolve_model_path(None))
    size = len(builtin.hf)
    tiny = dict(checkpoints.QWEN3_BASE, vocab_size=size + 40, hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    monkeypatch.setitem(checkpoints.SHAPES, "tiny", tiny)
    covered = Tokenizer(checkpoints.random_checkpoint("tiny", root=tmp_path))
    assert len(covered.hf) == size + 40
    assert all(covered.decode([i]).strip() for i in range(size - 5, size + 40))
    assert covered.decode([size + 3]) == f" w{size + 3}"
    assert covered.encode("hello world") == builtin.encode("hello world")  # encoding is unchanged


def test_the_front_end_benchmark_delivers_every_token_of_its_scripted_engine(tmp_path):
    from benchmarks import front_end

    out = tmp_path / "front_end.json"
    assert front_end.main(["--stage", SERVER_STAGES[-1], "--requests", "6", "--max-tokens", "5", "--step-ms", "2",
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # (30 tokens may take less CPU time than the clock resolves: the figure is present, not necessarily above 0)
    assert result["tokens"] == 30 and result["front_end_cpu_s_per_1000_tokens"] >= 0


def test_the_start_up_benchmark_times_a_server_until_it_is_healthy(tmp_path):
    """A stand-in stage whose server answers /health only after half a second (a real one takes seconds),
    and one that exits at start."""
    from benchmarks import server_start

    (tmp_path / "slow_stage").mkdir()
    (tmp_path / "slow_stage" / "__init__.py").write_text("")
    (tmp_path / "slow_stage" / "__main__.py").write_text(
        "import http.server, sys, time\n"
        "class Health(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
        "time.sleep(0.5)\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "http.server.HTTPServer(('127.0.0.1', port), Health).serve_forever()\n")
    out = tmp_path / "start.json"
    argv = ["--stage", "slow_stage", "--trees", str(tmp_path), "--repeats", "2", "--out", str(out)]
    assert server_start.main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert len(result["seconds_runs"]) == 2 and min(result["seconds_runs"]) >= 0.5  # never before it answers
    (tmp_path / "slow_stage" / "__main__.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match="did not start"):
        server_start.seconds_to_healthy("slow_stage", tmp_path, "cpu")


def test_teacher_forced_check_passes_correct_stages(checkpoints):
    from benchmarks import teacher_forced

    stages = ["stage01_core", "stage05_chunked", STAGES[-1]]
    results = teacher_forced.check_kind("moe", checkpoints["moe"], stages, "cpu", "float32", steps=6)
    assert [r["system"] for r in results] == ["transformers float32"] + stages
    assert all(r["ok"] and r["max_error"] < 1e-3 and r["steps"] == 8 * 6 for r in results)


def test_teacher_forced_check_catches_a_planted_decode_mask_bug(checkpoints, monkeypatch):
    import importlib

    from benchmarks import teacher_forced

    backend = importlib.import_module(f"{teacher_forced.PLANTED_STAGE}.attention_backend")
    monkeypatch.setattr(backend, "varlen_attention", backend.varlen_attention)  # restored after the test
    monkeypatch.setattr(backend.GatherAttention, "decode_attention", backend.GatherAttention.decode_attention)
    teacher_forced.plant_decode_off_by_one(teacher_forced.PLANTED_STAGE)
    (_, planted) = teacher_forced.check_kind("dense", checkpoints["dense"], [teacher_forced.PLANTED_STAGE], "cpu", "float32", steps=6)
    assert not planted["ok"] and planted["max_error"] > 0.1


@pytest.mark.parametrize("backend", ["runs", "gather"])
def test_the_gpu_graph_check_steps_run_on_the_cpu(backend, checkpoints, monkeypatch):
    """``benchmarks.gpu_graph_check``'s teacher-forced steps on the last stage, through uncaptured
    graphs (the CPU runs their forward directly): the check itself works (it once read an empty batch
    under the overlap schedule and failed on the GPU), and finds replay, unrecorded and eager equal."""
    import importlib

    from benchmarks import gpu_graph_check

    stage = STAGES[-1]
    monkeypatch.setattr(gpu_graph_check, "Engine", gpu_graph_check.Engine)  # use_stage sets these: restored after
    monkeypatch.setattr(gpu_graph_check, "EngineArgs", gpu_graph_check.EngineArgs)
    monkeypatch.setattr(gpu_graph_check, "ForwardBatch", gpu_graph_check.ForwardBatch)
    gpu_graph_check.use_stage(stage)
    graph_runner = importlib.import_module(f"{stage}.cuda_graph_runner").CudaGraphRunner
    with gpu_graph_check.Engine(model_path=str(checkpoints["dense"]), device="cpu", attention_backend=backend,
                                **gpu_graph_check.serial_schedule()) as engine:
        runner = engine.runner
        runner.graphs = graph_runner(runner.model, runner.attention_backend, runner.allocator.num_pages, 8,
                                     runner.config.max_position_embeddings, capture=False)
        for batch_size in (1, 5):
            ok, detail = gpu_graph_check.teacher_forced(engine, batch_size)
            assert ok, detail


def test_prompt_flops_count_every_projection_and_the_causal_attention(checkpoints):
    """Against the model's own weights: 2 FLOPs per weight of every projection per token (the
    embedding table is a lookup; the LM head scores one row), plus attention's two matmuls."""
    from benchmarks.flops import peak_flops, prompt_flops
    from common.qwen3 import Qwen3ForCausalLM

    config = ModelConfig.from_file(checkpoints["dense"])
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    projections = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    length, layers = 10, config.num_hidden_layers
    attention = 4 * layers * config.num_attention_heads * config.head_dim * sum(range(1, length + 1))
    head = 2 * config.hidden_size * config.vocab_size
    assert prompt_flops(config, length) == 2 * projections * length + attention + head
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("some other card") is None


def test_the_verify_step_benchmark_times_and_profiles_steps_on_the_cpu(checkpoints):
    """Each (batch, guesses) pair is timed with and without graphs and, with ``--profile``, counted
    under torch.profiler (no CUDA kernels on the CPU); each step is undone, so the next starts alike."""
    from benchmarks import speculative

    report = speculative.verify_step(argparse.Namespace(
        model=str(checkpoints["dense"]), device="cpu", batch_sizes=[1, 2], guesses=[0, 3], context=24, iters=1,
        kv_cache_bytes=8 << 20, profile=True))
    rows = [(r["batch"], r["guesses"]) for r in report["results"]]
    assert rows == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert all(r["step_ms"] > 0 and r["kernels_per_step"] == 0 and r["gpu_ms_per_step"] == 0 for r in report["results"])
    assert [r["step_vs_decode"] for r in report["results"] if r["guesses"] == 0] == [1.0, 1.0]
