"""Teacher-forced check: every stage's log-probabilities against transformers in fp32.

    python -m benchmarks.teacher_forced TOKENIZER_FOLDER                  (CUDA, bf16: every stage, dense / MoE / Llama)
    python -m benchmarks.teacher_forced TOKENIZER_FOLDER --plant-bug      (the same, with a decode-mask bug in stage 04)

In bf16 two correct engines may pick different greedy tokens: batched kernels
round differently, and once one token differs the two texts go separate
ways. So comparing tokens cannot tell rounding from a bug. This check feeds
every stage the *same* tokens: transformers' fp32 greedy continuation. The
stage's sampler is wrapped so that each step it records the row of
log-probabilities it was handed and then returns the reference token instead
of its own pick. Every step of every request is then compared with
transformers' fp32 forward over the same sequence:

* **log-probabilities**: over the reference's top-5 tokens, the largest
  difference must stay within the tolerance. The tolerance is set by
  rounding alone: ``SLACK`` times how far transformers' *own* bf16 forward
  is from its fp32 one on the same sequences, and at least ``FLOOR``.
* **greedy picks**: the stage's argmax may differ from the reference token
  only where the reference's top-2 margin is within twice the tolerance
  (each of the two log-probabilities may move by the tolerance).

Prompts come in batches of mixed lengths, then a second batch that extends
them (stages with a prefix cache serve those prefixes from it). A bug such as
a decode mask that misses the newest key moves log-probabilities by far more
than rounding does; ``--plant-bug`` shows the check catching one.
"""

import argparse
import importlib
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STAGES = sorted(p.name for p in ROOT.glob("stage[0-9][0-9]_*") if (p / "__init__.py").exists())
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOP = 5  # log-probabilities compared per step: the reference's most likely tokens
SLACK = 4.0  # a stage may be this many times as far from fp32 as transformers' own bf16 forward
FLOOR = 0.02  # nats: the tolerance never goes below this (fp32 runs, where the baseline is ~0)
PLANTED_STAGE = "stage04_batching"


def make_prompts(vocab_size: int, seed: int = 3) -> tuple[list[list[int]], list[list[int]]]:
    """A batch of mixed lengths, and a second batch that extends each of its prompts."""
    gen = torch.Generator().manual_seed(seed)
    first = [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in (5, 40, 17, 100)]
    second = [p + torch.randint(3, vocab_size, (n,), generator=gen).tolist() for p, n in zip(first, (3, 30, 1, 12))]
    return first, second


@torch.no_grad()
def reference(folder: Path, prompts: list[list[int]], steps: int, device: str, dtype: torch.dtype):
    """transformers on ``folder``: greedy continuations (fp32) and the log-probabilities of each step.

    Returns ``(continuations, {dtype name: [steps, vocab] per prompt})`` for fp32 and ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    continuations = [
        model.generate(torch.tensor([p], device=device), max_new_tokens=steps, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        for p in prompts
    ]
    logprobs = {}
    for name, model_dtype in (("float32", torch.float32), ("baseline", dtype)):
        model = model.to(model_dtype)
        logprobs[name] = []
        for p, c in zip(prompts, continuations):
            logits = model(torch.tensor([p + c[:-1]], device=device)).logits[0, len(p) - 1:]
            logprobs[name].append(logits.float().log_softmax(-1).cpu())
    return continuations, logprobs


class TeacherForcing:
    """Stands in for a stage's sampler: records each row's log-probabilities, returns the reference token."""

    def __init__(self, sampler, continuations: dict[tuple, list[int]]):
        self.sampler = sampler
        self.continuations = continuations
        self.logprobs: dict[tuple, list[torch.Tensor]] = defaultdict(list)

    def __getattr__(self, name):  # new_state, penalties, ...: the real sampler's
        return getattr(self.sampler, name)

    def __call__(self, logits: torch.Tensor, states) -> torch.Tensor:
        tokens = []
        for row, state in zip(logits, states):
            key = tuple(state.prompt_ids)
            tokens.append(self.continuations[key][len(self.logprobs[key])])
            self.logprobs[key].append(row.float().log_softmax(-1).cpu())
        return torch.tensor(tokens, device=logits.device)


def stage_logprobs(stage: str, folder: Path, batches, continuations, steps: int, device: str, dtype: str):
    """Run ``stage`` teacher-forced over the batches; return its ``[steps, vocab]`` per prompt."""
    engine_class = importlib.import_module(stage).Engine
    with engine_class(model_path=str(folder), device=device, dtype=dtype) as engine:
        forcing = TeacherForcing(engine.runner.sampler, continuations)
        engine.runner.sampler = forcing
        for prompts in batches:
            engine.generate_batch(prompts, max_tokens=steps, temperature=0, ignore_eos=True)
    return [torch.stack(forcing.logprobs[tuple(p)]) for prompts in batches for p in prompts]


def compare(reference_lp: list[torch.Tensor], stage_lp: list[torch.Tensor], tolerance: float) -> dict:
    """Largest top-5 log-prob difference, and greedy flips (those outside the margin are errors)."""
    errors, flips, bad_flips = [], 0, 0
    for ref, got in zip(reference_lp, stage_lp):
        top = ref.topk(TOP, dim=-1)
        errors.append((got.gather(1, top.indices) - top.values).abs().max(dim=1).values)
        margin = top.values[:, 0] - top.values[:, 1]
        flipped = got.argmax(-1) != top.indices[:, 0]
        flips += int(flipped.sum())
        bad_flips += int((flipped & (margin > 2 * tolerance)).sum())
    errors = torch.cat(errors)
    return dict(max_error=round(errors.max().item(), 5), mean_error=round(errors.mean().item(), 5),
                steps=len(errors), flips=flips, flips_outside_margin=bad_flips,
                ok=bool(errors.max().item() <= tolerance and bad_flips == 0))


def plant_decode_off_by_one(stage: str) -> None:
    """A planted bug: decode queries stop seeing their newest key (an off-by-one in the key length)."""
    module = importlib.import_module(f"{stage}.attention_backend")
    varlen = module.varlen_attention

    def varlen_missing_newest_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k):
        if max_q != 1:
            return varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
        keep = torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
        keep[cu_seqlens_k[1:] - 1] = False
        shorter = cu_seqlens_k - torch.arange(len(cu_seqlens_k), device=k.device, dtype=cu_seqlens_k.dtype)
        return varlen(q, k[keep], v[keep], cu_seqlens_q, shorter, max_q, max_k - 1)

    def decode_missing_newest_key(self, q, k_pool, v_pool):
        newest = self.key_mask.sum(dim=1) - 1
        self.key_mask = self.key_mask.clone()
        self.key_mask[torch.arange(len(newest)), newest] = False
        return decode_attention(self, q, k_pool, v_pool)

    decode_attention = module.GatherAttention.decode_attention
    module.varlen_attention = varlen_missing_newest_key  # the CUDA path
    module.GatherAttention.decode_attention = decode_missing_newest_key  # the CPU path


def check_kind(kind: str, folder: Path, stages: list[str], device: str, dtype: str, steps: int) -> list[dict]:
    """Every stage on one checkpoint; one result dict per stage (plus transformers' own baseline)."""
    from common.config import ModelConfig

    batches = make_prompts(ModelConfig.from_file(folder).vocab_size)
    prompts = [p for batch in batches for p in batch]
    continuations, ref = reference(folder, prompts, steps, device, DTYPES[dtype])
    baseline = compare(ref["float32"], ref["baseline"], float("inf"))
    tolerance = max(FLOOR, SLACK * baseline["max_error"])
    results = [dict(kind=kind, system=f"transformers {dtype}", tolerance=tolerance, **baseline)]
    by_prompt = {tuple(p): c for p, c in zip(prompts, continuations)}
    for stage in stages:
        got = stage_logprobs(stage, folder, batches, by_prompt, steps, device, dtype)
        results.append(dict(kind=kind, system=stage, tolerance=tolerance, **compare(ref["float32"], got, tolerance)))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_forced", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_folder", type=Path, help="tokenizer files for the random checkpoints")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stage folders")
    parser.add_argument("--kinds", default="dense,moe,llama,qwen2,qwen2_moe,mistral")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per request")
    parser.add_argument("--plant-bug", action="store_true", help=f"check that a decode-mask bug in {PLANTED_STAGE} fails")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if args.plant_bug:
        plant_decode_off_by_one(PLANTED_STAGE)
        stages = [PLANTED_STAGE]
    results = []
    with tempfile.TemporaryDirectory() as root:
        for kind in args.kinds.split(","):
            folder = write_checkpoint(kind, Path(root) / kind, args.tokenizer_folder)
            for r in check_kind(kind, folder, stages, args.device, args.dtype, args.steps):
                results.append(r)
                verdict = "info" if r["system"].startswith("transformers") else ("ok  " if r["ok"] else "FAIL")
                print(f"{verdict} {kind:<6} {r['system']:<22} max {r['max_error']:.4f} mean {r['mean_error']:.4f} "
                      f"(tolerance {r['tolerance']:.4f}) flips {r['flips']} outside margin {r['flips_outside_margin']}",
                      flush=True)
    failures = sum(not r["ok"] for r in results if not r["system"].startswith("transformers"))
    print("failures:", failures)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=args.device, dtype=args.dtype, planted_bug=args.plant_bug,
                                            torch=torch.__version__, results=results), indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
