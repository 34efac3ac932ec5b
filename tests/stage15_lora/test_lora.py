"""Stage 15: each request runs with its own LoRA adapter, many adapters in one batch.

The oracle is PEFT on transformers, with the same random adapters (nonzero B,
so every adapter changes the output): each request's greedy tokens equal
PEFT's for its adapter, and its logits are close in fp32. Requests without an
adapter equal stage 14. Then the technique's own invariants: one batch mixes
adapters and the base; the pool swaps adapters in and out when it has fewer
slots than adapters; K/V computed under one adapter is never reused under
another; adapters load and unload while requests run; tensor parallelism
gives the same tokens; bad adapters and settings are refused by name.
"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from checkpoints import write_adapter, write_checkpoint
from reference import RecordingSampler, hf_greedy, load_hf
from stage14_speculative import Engine as Stage14Engine
from stage15_lora import Engine
from stage15_lora.__main__ import build_parser
from stage15_lora.cuda_graph_runner import CudaGraphRunner

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (target modules, rank, alpha, rsLoRA)
ADAPTERS = {"qv": (["q_proj", "v_proj"], 8, 16, False), "all": (ALL, 4, 8, True),
            "mlp": (["o_proj", "gate_proj", "up_proj", "down_proj"], 16, 32, False)}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [300, 301, 302], [17, 230, 4012, 88, 17, 230]]
GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(checkpoints["dense"], root / name, *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def peft_tokens(checkpoints, adapters):
    """PEFT's greedy tokens per (adapter, prompt); the base model's under None."""
    memo = {}

    def tokens(name, prompt):
        if (name, tuple(prompt)) not in memo:
            model = load_hf(checkpoints["dense"])
            if name is not None:
                model = PeftModel.from_pretrained(model, adapters[name]).eval()
            memo[name, tuple(prompt)] = hf_greedy(model, prompt, GREEDY["max_tokens"])
        return memo[name, tuple(prompt)]

    return tokens


@pytest.fixture(scope="module")
def engine(checkpoints, adapters):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths=adapters) as engine:
        yield engine


def test_adapters_change_the_output(peft_tokens):
    """Otherwise every test below could pass with the adapters ignored."""
    assert len({tuple(peft_tokens(name, PROMPTS[0])) for name in [None, *ADAPTERS]}) == 1 + len(ADAPTERS)


@pytest.mark.parametrize("backend", ["grouped", "bmm", "dense"])
def test_one_batch_of_every_adapter_and_the_base_equals_peft(backend, checkpoints, adapters, peft_tokens):
    names = ["qv", None, "all", "mlp", "qv", None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths=adapters, lora_backend=backend) as engine:
        got = engine.generate_batch(prompts, lora_path=names, **GREEDY)
    assert [o.token_ids for o in got] == [peft_tokens(n, p) for n, p in zip(names, prompts)]


def test_base_requests_equal_stage14(checkpoints, engine):
    with Stage14Engine(model_path=str(checkpoints["dense"]), device="cpu") as before:
        expected = [o.token_ids for o in before.generate_batch(PROMPTS, **GREEDY)]
    assert [o.token_ids for o in engine.generate_batch(PROMPTS, **GREEDY)] == expected
    mixed = engine.generate_batch(PROMPTS + PROMPTS, lora_path=[None] * 3 + ["all"] * 3, **GREEDY)
    assert [o.token_ids for o in mixed[:3]] == expected


def test_logits_match_peft_in_fp32(checkpoints, adapters, engine):
    prompt = PROMPTS[0]
    for name in ADAPTERS:
        model = PeftModel.from_pretrained(load_hf(checkpoints["dense"]), adapters[name]).eval()
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0, -1]
        engine.runner.sampler = recorder = RecordingSampler(engine.runner.sampler)
        try:
            engine.generate(prompt, lora_path=name, max_tokens=1, temperature=0)
        finally:
            engine.runner.sampler = recorder.sampler
        torch.testing.assert_close(recorder.seen[0][0], expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["grouped", "dense"])
def test_decode_graphs_carry_each_rows_adapter(backend, checkpoints, adapters, peft_tokens):
    """Decode batches replay the graph of their bucket (the CPU runs its forward directly): each
    row's slot is a buffer of the graph, and padding rows and base rows take slot 0. A batch of
    base rows only replays a graph recorded without the adapters."""
    names = ["mlp", None, "qv"]  # three rows in the bucket of 4: one padding row
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths=adapters, lora_backend=backend,
                attention_backend="runs") as engine:  # as on CUDA
        runner = engine.runner
        runner.graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 4,
                                        runner.config.max_position_embeddings, capture=False, lora=runner.lora)
        runner.graphs.lora_slots.fill_(3)  # junk: run() must overwrite what it uses
        used, run = [], runner.graphs.run
        runner.graphs.run = lambda batch, bucket: used.append(bucket[4]) or run(batch, bucket)
        got = engine.generate_batch(PROMPTS, lora_path=names, **GREEDY)
        base = engine.generate_batch(PROMPTS, **GREEDY)
    assert [o.token_ids for o in got] == [peft_tokens(n, p) for n, p in zip(names, PROMPTS)]
    assert [o.token_ids for o in base] == [peft_tokens(None, p) for p in PROMPTS]
    assert True in used and False in used  # base-only batches replay graphs without the adapters' matmuls


def test_a_pool_smaller_than_the_adapters_swaps_them_in_and_out(checkpoints, adapters, peft_tokens):
    """Two slots, three adapters: the running set never needs more than two, and an adapter the
    batch does not need is evicted (least recently used first) to load the next."""
    names = ["qv", "all", "mlp", None, "mlp", "qv", "all"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths=adapters, max_loras_per_batch=2) as engine:
        pool, loads = engine.runner.lora, []
        load = pool._load
        pool._load = lambda slot, adapter: loads.append(adapter.name) or load(slot, adapter)
        step = engine.runner.launch
        seen = []

        def launch(requests, new_lengths):
            seen.append({r.lora_path for r in requests} - {None})
            return step(requests, new_lengths)

        engine.runner.launch = launch
        got = engine.generate_batch(prompts, lora_path=names, **GREEDY)
    assert [o.token_ids for o in got] == [peft_tokens(n, p) for n, p in zip(names, prompts)]
    assert max(len(s) for s in seen) == 2 and len(loads) >= 3  # never more than the slots; one evicted


def test_the_same_prompt_under_two_adapters_shares_no_cached_pages(engine):
    prompt = list(range(40, 90))  # several whole pages
    first = engine.generate(prompt, lora_path="qv", **GREEDY)
    assert engine.generate(prompt, lora_path="qv", **GREEDY).cached_tokens > 0  # its own prefix is reused
    other = engine.generate(prompt, lora_path="all", **GREEDY)
    base = engine.generate(prompt, **GREEDY)
    assert other.cached_tokens == 0 and base.cached_tokens == 0
    assert len({tuple(first.token_ids), tuple(other.token_ids), tuple(base.token_ids)}) == 3


def finish(engine, ids: list[int]) -> dict:
    """Step until the requests ``ids`` finish; their outputs by id."""
    outs = {}
    while len(outs) < len(ids):
        engine.step()
        outs |= {rid: out for rid in ids if rid not in outs and (out := engine.get_output(rid)) is not None}
    return outs


def test_adapters_load_and_unload_while_requests_run(checkpoints, adapters, peft_tokens):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths={"qv": adapters["qv"]},
                max_lora_rank=16, lora_target_modules="all") as engine:
        running = engine.add_request(PROMPTS[0], lora_path="qv", **GREEDY)
        engine.step()
        engine.load_lora_adapter("mlp", adapters["mlp"])
        late = engine.add_request(PROMPTS[1], lora_path="mlp", **GREEDY)
        with pytest.raises(ValueError, match="used by 1 unfinished"):
            engine.unload_lora_adapter("qv")
        finish(engine, [running, late])
        engine.unload_lora_adapter("qv")
        with pytest.raises(ValueError, match="no LoRA adapter named 'qv'"):
            engine.generate(PROMPTS[0], lora_path="qv", **GREEDY)
        engine.load_lora_adapter("qv", adapters["all"])  # a new adapter under the old name: no stale cache
        again = engine.generate(PROMPTS[0], lora_path="qv", **GREEDY)
        assert engine.runner.allocator.num_free + engine.runner.evictable_pages() == engine.runner.allocator.num_pages
    assert again.token_ids == peft_tokens("all", PROMPTS[0])


def test_outputs_of_running_requests_equal_peft_after_a_load(checkpoints, adapters, peft_tokens):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", max_lora_rank=16, lora_target_modules=ALL) as engine:
        engine.load_lora_adapter("all", adapters["all"])
        first = engine.add_request(PROMPTS[2], lora_path="all", **GREEDY)
        engine.step()
        engine.load_lora_adapter("qv", adapters["qv"])
        second = engine.add_request(PROMPTS[2], lora_path="qv", **GREEDY)
        outs = finish(engine, [first, second])
    assert outs[first].token_ids == peft_tokens("all", PROMPTS[2])
    assert outs[second].token_ids == peft_tokens("qv", PROMPTS[2])


@pytest.mark.distributed
def test_tensor_parallel_adapters_equal_peft(checkpoints, adapters, peft_tokens):
    names = ["all", None, "mlp"]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", tp_size=2, lora_paths=adapters) as engine:
        got = engine.generate_batch(PROMPTS, lora_path=names, **GREEDY)
    assert [o.token_ids for o in got] == [peft_tokens(n, p) for n, p in zip(names, PROMPTS)]


def test_moe_attention_adapter_equals_peft(checkpoints, tmp_path):
    folder = checkpoints["moe"]
    path = write_adapter(folder, tmp_path / "attn", ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 16, False, seed=3)
    model = PeftModel.from_pretrained(load_hf(folder), path).eval()
    with Engine(model_path=str(folder), device="cpu", lora_paths={"attn": path}) as engine:
        got = engine.generate_batch(PROMPTS[:2], lora_path=["attn", None], **GREEDY)
    assert got[0].token_ids == hf_greedy(model, PROMPTS[0], GREEDY["max_tokens"])
    assert got[1].token_ids == hf_greedy(load_hf(folder), PROMPTS[1], GREEDY["max_tokens"])


# ----- refusals -----------------------------------------------------------------------------------


def edited_adapter(source: str, out, config=None, rename=None):
    """A copy of an adapter with its config changed or a tensor renamed."""
    out.mkdir()
    settings = json.loads(Path(source, "adapter_config.json").read_text()) | (config or {})
    (out / "adapter_config.json").write_text(json.dumps(settings))
    tensors = load_file(f"{source}/adapter_model.safetensors")
    if rename:
        tensors = {key.replace(*rename): value for key, value in tensors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return str(out)


def test_bad_adapters_are_refused_at_load(checkpoints, adapters, engine, tmp_path, builtin_folder):
    other = write_checkpoint("dense", tmp_path / "other", builtin_folder, hidden_size=96)
    cases = {
        "rank 16, above max_lora_rank=8": (adapters["mlp"], dict(max_lora_rank=8)),
        "trained for another model": (write_adapter(other, tmp_path / "o", ["q_proj"], 4, 8, False, 0), {}),
        "no adapter_config.json": (str(tmp_path), {}),
        "DoRA": (edited_adapter(adapters["qv"], tmp_path / "dora", {"use_dora": True}), {}),
        "outside lora_target_modules": (adapters["all"], dict(lora_target_modules=["q_proj", "v_proj"])),
        "not a LoRA weight": (edited_adapter(adapters["mlp"], tmp_path / "moe", rename=("mlp.down_proj", "mlp.experts.0.down_proj")), {}),
    }
    for message, (path, settings) in cases.items():
        with pytest.raises(ValueError, match=message):
            Engine(model_path=str(checkpoints["dense"]), device="cpu", lora_paths={"x": path}, **settings)
    with (Engine(model_path=str(checkpoints["dense"]), device="cpu", max_lora_rank=8, lora_target_modules="all") as small,
          pytest.raises(ValueError, match="rank 16, above max_lora_rank=8")):
        small.load_lora_adapter("mlp", adapters["mlp"])
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora_adapter("qv", adapters["qv"])
    assert engine.generate(PROMPTS[0], lora_path="qv", **GREEDY).completion_tokens == GREEDY["max_tokens"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_path="nope"), "no LoRA adapter named 'nope'"),
    (dict(lora_path=["qv"]), "one per prompt"),
])
def test_bad_requests_are_refused_and_leave_no_trace(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate_batch(PROMPTS[:2], **kwargs, **GREEDY)
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("settings, message", [
    (dict(max_loras_per_batch=0), "max_loras_per_batch"),
    (dict(max_lora_rank=-4), "max_lora_rank"),
    (dict(lora_paths={}), "lora_paths is empty"),
    (dict(lora_paths={"a": 3}), "lora_paths must map"),
    (dict(lora_backend="triton"), "lora_backend"),
    (dict(max_lora_rank=8, lora_target_modules=["qkv"]), "lora_target_modules"),
])
def test_bad_lora_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Engine(device="cpu", **settings)


def test_an_engine_without_adapters_refuses_lora_requests(checkpoints):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        with pytest.raises(ValueError, match="serves no LoRA adapters"):
            engine.generate(PROMPTS[0], lora_path="qv", **GREEDY)
        with pytest.raises(ValueError, match="serves no LoRA adapters"):
            engine.load_lora_adapter("qv", "/nowhere")


def test_command_line_flags_are_sglangs():
    args = build_parser().parse_args(["p", "--lora-paths", "a=/x", "/y", "--max-loras-per-batch", "2", "--max-lora-rank",
                                      "32", "--lora-target-modules", "q_proj", "v_proj", "--lora-backend", "bmm",
                                      "--lora-path", "a"])
    assert (args.lora_paths, args.max_loras_per_batch, args.max_lora_rank, args.lora_target_modules,
            args.lora_backend, args.lora_path) == (["a=/x", "/y"], 2, 32, ["q_proj", "v_proj"], "bmm", "a")
