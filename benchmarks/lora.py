"""Multi-LoRA serving (stage 15): what adapters cost beside the base model.

    python -m benchmarks.lora [--model qwen3-0.6b] [--device cuda] [--requests 128] [--repeat 3] [--out FILE]

Writes ``--adapters`` random adapters of rank ``--rank`` on every projection
(in PEFT's file layout), then serves the random workload (nano-vllm's:
input and output lengths uniform in 100..1024 on a GPU) with stage 15:

* ``base only``: an engine with no adapters (stage 14's path);
* ``N adapters, grouped`` / ``bmm`` / ``dense``: the requests spread round-robin
  over the adapters, with ``torch._grouped_mm``, the gather-bmm, or the matmuls
  over every slot at once (``stage15_lora/lora_layers.py``);
* ``LoRA engine, base requests``: the grouped engine serving the base alone
  (what serving adapters costs requests that use none: its graphs carry slot 0);

and one request at a time (batch 1, 128 prompt tokens, 256 new) for the
base and for an adapter. Systems run interleaved, ``--repeat`` rounds after a
warm-up; each reports its median round. Greedy, ignore_eos.
"""

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.__main__ import environment, resolve_model
from benchmarks.workloads import make_workload
from common.config import ModelConfig

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_adapter(model_folder: Path, out: Path, rank: int, seed: int) -> str:
    """A PEFT-layout adapter of ``rank`` on every projection of every layer, with random A and B
    small enough that the model stays a model (the delta is about 1% of the base output)."""
    config = ModelConfig.from_file(model_folder)
    hidden, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {"q_proj": (config.num_attention_heads * d, hidden), "k_proj": (config.num_key_value_heads * d, hidden),
              "v_proj": (config.num_key_value_heads * d, hidden), "o_proj": (hidden, config.num_attention_heads * d),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for layer in range(config.num_hidden_layers):
        for name, (out_features, in_features) in shapes.items():
            block = "self_attn" if name in PROJECTIONS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": PROJECTIONS, "bias": "none"}))
    return str(out)


def serve(engine, prompts, max_tokens, adapters) -> dict:
    """One round: every request through ``generate_batch``; output tok/s."""
    from stage15_lora import SamplingParams

    start = time.perf_counter()
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    outs = engine.generate_batch(prompts, params, lora_path=adapters)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    return dict(seconds=round(seconds, 3), output_tokens=tokens, output_tokens_per_s=round(tokens / seconds, 1))


def run(args) -> dict:
    from stage15_lora import Engine

    model_path, folder = resolve_model(args.model, args.device)
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    names = [f"adapter{i}" for i in range(args.adapters)]
    paths = {name: write_random_adapter(folder, root / name, args.rank, seed=i) for i, name in enumerate(names)}
    common = dict(model_path=model_path, device=args.device, kv_cache_bytes=args.kv_cache_bytes)
    engines = {"base": Engine(**common)}
    for backend in list(args.backends):
        try:
            engines[backend] = Engine(lora_paths=paths, max_loras_per_batch=args.adapters, lora_backend=backend, **common)
        except ValueError as error:  # grouped matmuls this torch or device does not run
            print(f"{backend}: {error}", flush=True)
            args.backends.remove(backend)
    vocab = engines["base"].config.vocab_size
    size = "gpu" if args.device.startswith("cuda") else "cpu"
    workload = make_workload("random", size, vocab, requests=args.requests)
    single = make_workload("single", size, vocab)
    spread = [names[i % len(names)] for i in range(len(workload.prompts))]
    systems = {"base only": ("base", workload, None)}
    for backend in args.backends:
        systems[f"{args.adapters} adapters, {backend}"] = (backend, workload, spread)
    systems["LoRA engine, base requests"] = (args.backends[0], workload, None)
    systems["batch 1, base"] = ("base", single, None)
    for backend in args.backends:
        systems[f"batch 1, adapter, {backend}"] = (backend, single, [names[0]])
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    for repeat in range(args.repeat + 1):  # round 0 warms up (graphs for new key buckets, caches)
        for name, (engine, load, adapters) in systems.items():
            engines[engine].flush_cache()  # every round prefills its prompts afresh
            result = serve(engines[engine], load.prompts, load.max_tokens, adapters)
            if repeat:
                rounds[name].append(result)
            print(repeat, name, result, flush=True)
    for engine in engines.values():
        engine.shutdown()
    results = []
    for name, name_rounds in rounds.items():
        speeds = [r["output_tokens_per_s"] for r in name_rounds]
        results.append(dict(system=name, output_tokens_per_s=statistics.median(speeds), min=min(speeds), max=max(speeds),
                            runs=speeds))
    by_name = {r["system"]: r["output_tokens_per_s"] for r in results}
    for r in results:
        base = by_name["batch 1, base"] if r["system"].startswith("batch 1") else by_name["base only"]
        r["vs_base"] = round(r["output_tokens_per_s"] / base, 3)
    return dict(environment=environment(), model=args.model, device=args.device, workload=workload.description,
                single=single.description, adapters=args.adapters, rank=args.rank, repeat=args.repeat, results=results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=None, help="keep the first N requests of the workload")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--backends", default="grouped,bmm,dense", type=lambda s: s.split(","))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kv-cache-bytes", type=int, default=None, help="each engine's KV pool (three engines share the device)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
