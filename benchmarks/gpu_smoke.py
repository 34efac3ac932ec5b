"""CUDA correctness on the GPU box: every stage against transformers on the same random weights.

    python -m benchmarks.gpu_smoke        (needs a CUDA GPU; prints one line per check)

In fp32 the stages must give transformers' greedy tokens exactly, for a first
batch of prompts and then for a second batch that extends them (stages with a
prefix cache serve those prefixes from it, through the cached-prefix attention
path). bf16 is checked by ``python -m benchmarks.teacher_forced``: there two
correct engines may pick different tokens, so it compares log-probabilities on
the same tokens instead.
"""

import importlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import write_checkpoint
from reference import load_hf

STAGES = sorted(p.name for p in Path(__file__).resolve().parent.parent.glob("stage[0-9][0-9]_*") if (p / "__init__.py").exists())


@torch.no_grad()
def hf_greedy_cuda(folder, prompts, max_new):
    model = load_hf(folder).to("cuda")
    return [
        model.generate(torch.tensor([p], device="cuda"), max_new_tokens=max_new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        for p in prompts
    ]


def check_varlen_kernel() -> bool:
    """The flash varlen call (bf16, grouped KV heads, queries at the end of cached keys)
    against the per-sequence SDPA loop in fp32, on fresh random data."""
    from common.attention import causal_attention, varlen_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    cu = lambda lens: torch.tensor([0] + lens, device="cuda").cumsum(0)
    ok = True
    for name, new, total in [("mixed", [1, 1, 7, 40, 1, 300], [90, 1, 7, 200, 513, 300]),  # decodes, fresh and cached-prefix prompts
                             ("decode", [1] * 5, [90, 1, 7, 513, 300])]:  # the grouped-query decode path
        q = torch.randn(sum(new), 16, 128, device="cuda", generator=gen)
        k, v = (torch.randn(sum(total), 8, 128, device="cuda", generator=gen) for _ in range(2))
        out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu(new), cu(total), max(new), max(total)).float()
        ref = torch.cat([causal_attention(q[a:b], k[c:d], v[c:d]) for a, b, c, d in
                         zip(cu(new)[:-1], cu(new)[1:], cu(total)[:-1], cu(total)[1:])])
        error = ((out - ref).norm() / ref.norm()).item()
        ok &= error < 1e-2
        print(f"{'ok  ' if error < 1e-2 else 'FAIL'} varlen_attention {name} bf16 vs fp32 SDPA: relative error {error:.2e}", flush=True)
    return ok


def main(tokenizer_folder: str) -> int:
    failures = 0 if check_varlen_kernel() else 1
    gen = torch.Generator().manual_seed(3)
    first = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 40, 17, 100)]
    second = [p + torch.randint(3, 49152, (n,), generator=gen).tolist() for p, n in zip(first, (3, 30, 1, 12))]
    with tempfile.TemporaryDirectory() as root:
        for kind in ("dense", "moe", "llama", "qwen2", "qwen2_moe", "mistral"):
            folder = write_checkpoint(kind, Path(root) / kind, Path(tokenizer_folder))
            expected = hf_greedy_cuda(folder, first + second, 16)
            for stage in STAGES:
                with importlib.import_module(stage).Engine(model_path=str(folder), device="cuda", dtype="float32") as engine:
                    tokens = [o.token_ids for prompts in (first, second)
                              for o in engine.generate_batch(prompts, max_tokens=16, temperature=0, ignore_eos=True)]
                ok = tokens == expected
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {kind:<6} {stage:<20} float32 vs transformers", flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
