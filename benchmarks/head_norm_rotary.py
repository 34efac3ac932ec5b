"""Qwen3's q/k head norms and rotary embedding, one layer on the GPU: rotary's half swap by ``roll`` against ``cat``.

    python -m benchmarks.head_norm_rotary [--tokens 1 64 ...] [--out FILE]

For ``tokens`` rows of Qwen3-0.6B's q and k heads (16 + 8 heads of 128, bf16,
a strided view of the qkv projection's output, as the model has them):

* ``norm``: the heads' ``F.rms_norm`` alone (it copies the strided view first);
* ``swap``: the halves swapped by ``roll`` against one ``cat`` of the two halves;
* ``block``: norm, weight and rotary, with ``roll`` (before) against
  ``Attention``'s spelling (``common.rope.apply_rotary``).

Times are the median of interleaved repeats (each the mean of ``--calls`` calls,
eagerly: the few-token cases measure launches more than kernels);
``max_abs_diff`` compares the two blocks' outputs.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from benchmarks.attention_runs import time_ms
from common.rope import apply_rotary

HEADS, KV_HEADS, HEAD_DIM, EPS = 16, 8, 128, 1e-6


def old_block(qk, weight, cos, sin):
    qk = F.rms_norm(qk, (HEAD_DIM,), eps=EPS) * weight
    return torch.addcmul(qk * cos[:, None], qk.roll(HEAD_DIM // 2, dims=-1), sin[:, None])


def measure(tokens: int, repeats: int, calls: int) -> dict:
    gen = torch.Generator("cuda").manual_seed(0)
    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    qk = qkv[:, : HEADS + KV_HEADS]
    weight = torch.rand(HEADS + KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
    angles = torch.rand(tokens, HEAD_DIM // 2, device="cuda", generator=gen) * 6.28
    cos = torch.cat([angles.cos()] * 2, -1).bfloat16()
    sin = torch.cat([-angles.sin(), angles.sin()], -1).bfloat16()
    half = HEAD_DIM // 2
    calls_by_name = {
        "norm": lambda: F.rms_norm(qk, (HEAD_DIM,), eps=EPS),
        "swap_roll": lambda: qk.roll(half, dims=-1),
        "swap_cat": lambda: torch.cat((qk[..., half:], qk[..., :half]), dim=-1),
        "block_old": lambda: old_block(qk, weight, cos, sin),
        "block_new": lambda: apply_rotary(F.rms_norm(qk, (HEAD_DIM,), eps=EPS) * weight, cos, sin),
    }
    outputs = {name: fn() for name, fn in calls_by_name.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in calls_by_name}
    for _ in range(repeats):
        for name, fn in calls_by_name.items():
            times[name].append(time_ms(fn, calls))
    result = dict(tokens=tokens, rows=tokens * (HEADS + KV_HEADS))
    result.update({f"{name}_us": round(1000 * statistics.median(t), 2) for name, t in times.items()})
    for a, b in (("swap_roll", "swap_cat"), ("block_old", "block_new")):
        result[f"{a}_over_{b.split('_')[1]}"] = round(result[f"{a}_us"] / result[f"{b}_us"], 3)
    result["max_abs_diff"] = (outputs["block_old"].float() - outputs["block_new"].float()).abs().max().item()
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_norm_rotary")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 512, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    results = []
    for tokens in args.tokens:
        results.append(measure(tokens, args.repeats, args.calls))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
