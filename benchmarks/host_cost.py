"""Host cost of a decode step per running request, on the CPU with a model too small to matter.

    python -m benchmarks.host_cost [--stages stage04_batching,stage06_scheduling] [--option NAME=VALUE ...] [--out FILE]

With a 2-layer, 64-wide model the forward costs next to nothing, so a decode
step's time is the engine's own work: scheduling, page tables, batch
preparation, sampling, stop checks. The slope of the median step time between
a small and a large batch is that work per running request (greedy and at
temperature 0.7). The GPU fast path keeps it under about 100 us greedy.
"""

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import write_checkpoint
from common.loader import resolve_model_path

SMALL, LARGE = 8, 64
VOCAB = 1024


def decode_step_ms(engine, batch: int, temperature: float) -> float:
    """Median decode step time with ``batch`` requests running (all prompts prefilled)."""
    gen = torch.Generator().manual_seed(batch)
    ids = [engine.add_request(torch.randint(3, VOCAB, (32,), generator=gen).tolist(), max_tokens=400,
                              temperature=temperature, ignore_eos=True) for _ in range(batch)]
    for _ in range(batch + 4):  # admission and prefill, then a few decodes
        engine.step()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in ids:
        engine.abort_request(request_id)
        engine.get_output(request_id)
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_cost")
    parser.add_argument("--stages", default="stage04_batching,stage05_chunked,stage06_scheduling")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine keyword, e.g. attention_backend=runs (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    options = dict(option.split("=", 1) for option in args.option)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as root:
        # A 1024-token vocabulary keeps the output head negligible too (49k would make it real work).
        folder = write_checkpoint("dense", Path(root) / "dense", resolve_model_path(None), vocab_size=VOCAB)
        for stage in args.stages.split(","):
            with importlib.import_module(stage).Engine(model_path=str(folder), device="cpu", **options) as engine:
                for temperature in (0.0, 0.7):
                    small, large = (decode_step_ms(engine, b, temperature) for b in (SMALL, LARGE))
                    results.append(dict(stage=stage, options=options, temperature=temperature, step_ms_small=round(small, 3),
                                        step_ms_large=round(large, 3),
                                        us_per_request=round((large - small) / (LARGE - SMALL) * 1000, 1)))
                    print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(batch_sizes=[SMALL, LARGE], results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
