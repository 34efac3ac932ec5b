"""Stage 15 on a GPU: adapters through CUDA graphs (dense and grouped) give the eager gather-bmm's tokens.

    python -m benchmarks.gpu_lora_check [--model qwen3-0.6b] [--out FILE]

Random adapters of rank 16 on every projection (``benchmarks/lora.py``), 16
prompts, each with one of 4 adapters or none. In bf16, two ways of adding the
same correction round differently, so their tokens may part once two
candidates are within rounding of each other; the report gives, per request,
how many leading tokens agree for pairs of engines: each backend's graphs
against the eager gather-bmm, dense graphs against dense eager (the same
arithmetic: must agree), and dense against gather-bmm in fp32 (rounding
too small to matter: must agree). Also the base requests against an engine
with no adapters at all.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

from benchmarks.__main__ import environment, resolve_model
from benchmarks.lora import write_random_adapter


def agreeing(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> int:
    from stage15_lora import Engine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_lora_check")
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model_path, folder = resolve_model(args.model, "cuda")
    root = Path(tempfile.mkdtemp(prefix="lora-check-"))
    paths = {f"a{i}": write_random_adapter(folder, root / f"a{i}", 16, seed=i) for i in range(4)}
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 50000) for _ in range(rng.randint(20, 200))] for _ in range(16)]
    names = [None if i % 5 == 4 else f"a{i % 4}" for i in range(16)]
    params = dict(max_tokens=64, temperature=0, ignore_eos=True)
    got = {}
    for label, kwargs in {"bmm, eager": dict(lora_backend="bmm", disable_cuda_graph=True),
                          "dense, CUDA graphs": dict(lora_backend="dense"),
                          "dense, eager": dict(lora_backend="dense", disable_cuda_graph=True),
                          "grouped, CUDA graphs": dict(lora_backend="grouped"),
                          "fp32 bmm, eager": dict(lora_backend="bmm", dtype="float32"),
                          "fp32 dense, eager": dict(lora_backend="dense", dtype="float32")}.items():
        with Engine(model_path=model_path, device="cuda", lora_paths=paths, kv_cache_bytes=8 << 30, **kwargs) as engine:
            got[label] = [o.token_ids for o in engine.generate_batch(prompts, lora_path=names, **params)]
            replays = engine.runner.graphs.replays if engine.runner.graphs is not None else 0
            print(label, "graph replays", replays, flush=True)
    with Engine(model_path=model_path, device="cuda", kv_cache_bytes=8 << 30) as engine:
        base = [o.token_ids for o in engine.generate_batch([p for p, n in zip(prompts, names) if n is None], **params)]
    reference = got["bmm, eager"]
    pairs = [("dense, CUDA graphs", "bmm, eager"), ("grouped, CUDA graphs", "bmm, eager"),
             ("dense, CUDA graphs", "dense, eager"), ("fp32 dense, eager", "fp32 bmm, eager")]
    report = dict(environment=environment(), model=args.model, requests=len(prompts), max_tokens=params["max_tokens"],
                  agreeing_tokens={f"{x} vs {y}": [agreeing(a, b) for a, b in zip(got[x], got[y])] for x, y in pairs},
                  base_requests_equal_no_adapter_engine=[x == y for x, y in zip([t for t, n in zip(reference, names) if n is None], base)])
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
