"""Stage 09 on the GPU: replayed graphs compute what the eager forward computes.

    python -m benchmarks.gpu_graph_check TOKENIZER_FOLDER    (needs CUDA; tp=2 runs when 2 GPUs are present)

For random tiny dense / MoE / Llama checkpoints in bf16, on one decode batch
(teacher-forced: the same inputs both ways), the logits of the graph replay
against those of the eager forward: greedy tokens must agree wherever the
eager top-2 margin is above bf16 rounding, and the logits must stay within a
bf16 tolerance. Then whole greedy generations with graphs and with
``disable_cuda_graph``, reported as the share of requests with identical
tokens. Last, the start-up figures for Qwen3-0.6B shapes: graphs recorded,
seconds, device memory.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import write_checkpoint  # noqa: E402

from benchmarks.checkpoints import random_checkpoint  # noqa: E402
from stage09_cuda_graph import Engine  # noqa: E402
from stage09_cuda_graph.forward_batch import ForwardBatch  # noqa: E402

LOGITS_TOLERANCE = 0.05  # of the logits' spread (their standard deviation): bf16 keeps ~3 digits


def prompts(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (int(n),), generator=gen).tolist() for n in torch.randint(3, 300, (count,), generator=gen)]


def decode_batch(runner, running) -> ForwardBatch:
    """The next decode step of ``running`` as a ForwardBatch (what ModelRunner.step builds)."""
    input_ids, positions, rows, seq_lens, updates = [], [], [], [], ([], [], [])
    for r in running:
        runner.allocate_cache(r, r.num_cached + 1)
        input_ids.append(r.all_ids[r.num_cached])
        positions.append(r.num_cached)
        rows.append(r.table_row)
        seq_lens.append(r.num_cached + 1)
        runner.page_tables.pending_updates(r, *updates)
    n = len(running)
    return ForwardBatch.build(runner.device, input_ids, positions, rows, [1] * n, seq_lens, list(range(n)), updates)


@torch.inference_mode()
def teacher_forced(engine, batch_size: int) -> tuple[bool, str]:
    runner = engine.runner
    for p in prompts(batch_size, seed=batch_size):
        engine.add_request(p, max_tokens=8, temperature=0, ignore_eos=True)
    engine.step()  # prefill; every request then decodes
    batch = decode_batch(runner, engine.scheduler.running)
    graphs, runner.graphs = runner.graphs, None
    eager = runner.forward(batch)  # writes this step's K/V; the replay writes the same again
    runner.graphs = graphs
    replays = graphs.replays
    replayed = runner.forward(batch)
    assert graphs.replays == replays + 1, "the batch did not run through a graph"
    top2 = eager.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]) / eager.std(dim=-1)
    error = ((replayed - eager).abs().amax(dim=-1) / eager.std(dim=-1))
    flipped = (replayed.argmax(-1) != eager.argmax(-1)) & (margin > 2 * LOGITS_TOLERANCE)
    ok = bool((error < LOGITS_TOLERANCE).all()) and not bool(flipped.any())
    for r in list(engine.scheduler.running):
        engine.scheduler.abort(r)
    return ok, f"max error {error.max().item():.3f} of the logits' spread, {int(flipped.sum())} confident flips"


def generations(folder, tp_size: int = 1) -> str:
    batch = prompts(24, seed=7)
    outputs = {}
    for disable in (False, True):
        with Engine(model_path=str(folder), device="cuda", dtype="bfloat16", tp_size=tp_size,
                    disable_cuda_graph=disable, cuda_graph_max_bs=32) as engine:
            outputs[disable] = [o.token_ids for o in engine.generate_batch(batch, max_tokens=32, temperature=0, ignore_eos=True)]
            if not disable:
                replays = engine.runner.graphs.replays
    same = sum(a == b for a, b in zip(outputs[False], outputs[True]))
    return f"{same}/{len(batch)} requests token-identical with and without graphs ({replays} steps replayed)"


def check_kind(kind: str, folder: Path) -> int:
    """The checks of one checkpoint kind; returns how many failed."""
    failures = 0
    with Engine(model_path=str(folder), device="cuda", dtype="float32") as engine:
        ok = engine.runner.graphs is None
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {kind:<6} fp32 runs eagerly (the flash kernel is bf16/fp16 only)", flush=True)
    with Engine(model_path=str(folder), device="cuda", dtype="bfloat16", cuda_graph_max_bs=32) as engine:
        for batch_size in (1, 5, 32):
            ok, detail = teacher_forced(engine, batch_size)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {kind:<6} bf16 teacher-forced decode, batch {batch_size:>2}: {detail}", flush=True)
    print(f"info {kind:<6} bf16 greedy: {generations(folder)}", flush=True)
    if torch.cuda.device_count() >= 2:
        print(f"info {kind:<6} bf16 greedy tp=2: {generations(folder, tp_size=2)}", flush=True)
    return failures


def main(tokenizer_folder: str) -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as root:
        for kind in ("dense", "moe", "llama"):
            folder = write_checkpoint(kind, Path(root) / kind, Path(tokenizer_folder))
            try:
                failures += check_kind(kind, folder)
            except Exception as error:  # report, and go on with the other kinds
                failures += 1
                print(f"FAIL {kind:<6} {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
    folder = random_checkpoint("qwen3-0.6b")
    with Engine(model_path=str(folder), device="cuda", dtype="bfloat16") as engine:
        graphs = engine.runner.graphs
        print(f"info qwen3-0.6b start-up: {len(graphs.graphs)} graphs (bs {graphs.batch_sizes[0]}..{graphs.max_bs}) "
              f"in {graphs.capture_seconds:.1f} s, {graphs.memory_bytes / 2**20:.0f} MiB", flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
