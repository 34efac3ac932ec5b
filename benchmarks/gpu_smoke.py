"""CUDA correctness on the GPU box: every stage against transformers on the same random weights.

    python -m benchmarks.gpu_smoke        (needs a CUDA GPU; prints one line per check)

In fp32 the stages must give transformers' greedy tokens exactly; in bf16 the
stages must agree with each other (their kernels see the same numbers).
"""

import importlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import write_checkpoint  # noqa: E402
from reference import load_hf  # noqa: E402

STAGES = sorted(p.name for p in Path(__file__).resolve().parent.parent.glob("stage0*_*") if (p / "__init__.py").exists())


@torch.no_grad()
def hf_greedy_cuda(folder, prompts, max_new):
    model = load_hf(folder).to("cuda")
    return [
        model.generate(torch.tensor([p], device="cuda"), max_new_tokens=max_new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        for p in prompts
    ]


def main(tokenizer_folder: str) -> int:
    failures = 0
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 40, 17, 100)]
    with tempfile.TemporaryDirectory() as root:
        for kind in ("dense", "moe", "llama"):
            folder = write_checkpoint(kind, Path(root) / kind, Path(tokenizer_folder))
            expected = hf_greedy_cuda(folder, prompts, 16)
            bf16 = {}
            for stage in STAGES:
                engine_class = importlib.import_module(stage).Engine
                for dtype in ("float32", "bfloat16"):
                    with engine_class(model_path=str(folder), device="cuda", dtype=dtype) as engine:
                        tokens = [o.token_ids for o in engine.generate_batch(prompts, max_tokens=16, temperature=0, ignore_eos=True)]
                    if dtype == "float32":
                        ok = tokens == expected
                    else:
                        bf16.setdefault("first", tokens)
                        ok = tokens == bf16["first"]
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {kind:<6} {stage:<20} {dtype}", flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
