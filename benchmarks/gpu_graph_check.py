"""Stage 09 on the GPU: replayed graphs compute what the eager forward computes.

    python -m benchmarks.gpu_graph_check TOKENIZER_FOLDER [--stage STAGE]    (needs CUDA; tp=2 runs when 2 GPUs are present)

``--stage`` checks a later stage's graphs the same way (default stage 09;
stage 12's decode graphs read page runs in place).

For random tiny dense / MoE / Llama checkpoints in bf16, on one decode batch
(teacher-forced: the same inputs every way), the logits of the graph replay
against (1) the recorded forward run without the graph, on the same buffers:
within a bf16 tolerance, and greedy tokens agreeing wherever the top-2 margin
is above bf16 rounding; (2) stage 08's eager path: greedy tokens agreeing the
same way. (2) has no logits tolerance: a batch of one attends with another
kernel inside the graph, which rounds differently, and a MoE router can turn
a rounding difference into another expert. Then whole greedy generations with graphs and with
``disable_cuda_graph``, and stage 10's with and without its overlap schedule,
reported as the share of requests with identical tokens. Last, the start-up figures for Qwen3-0.6B shapes: graphs recorded,
seconds, device memory.
"""

import argparse
import dataclasses
import importlib
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchmarks.checkpoints import random_checkpoint
from checkpoints import write_checkpoint
from stage09_cuda_graph import Engine
from stage09_cuda_graph.engine_args import EngineArgs
from stage09_cuda_graph.forward_batch import ForwardBatch
from stage10_overlap import Engine as Stage10

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
    if hasattr(runner.attention_backend, "batch_runs"):  # stage 12: where each sequence's keys lie
        return ForwardBatch.build(runner.device, input_ids, positions, rows, [1] * n, seq_lens, list(range(n)), updates,
                                  runner.attention_backend.batch_runs(running, seq_lens, [1] * n))
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
    replayed = runner.forward(batch).clone()  # a view of the graphs' logits buffer: the next forward overwrites it
    assert graphs.replays == replays + 1, "the batch did not run through a graph"
    # The recorded forward run again without the graph, on the buffers the replay just read.
    unrecorded = graphs.graph_for(graphs.bucket(batch)).forward()[: len(batch.positions)]
    same_error, same_flips = compare(replayed, unrecorded)
    eager_error, eager_flips = compare(replayed, eager)
    ok = same_error < LOGITS_TOLERANCE and same_flips == 0 and eager_flips == 0
    for r in list(engine.scheduler.running):
        engine.scheduler.abort(r)
    return ok, (f"vs the same forward unrecorded: max error {same_error:.3f} of the logits' spread, {same_flips} confident flips; "
                f"vs stage 08's eager path: {eager_flips} confident flips (max error {eager_error:.3f})")


def compare(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """(max error in units of the reference logits' spread, argmax flips where the reference's top-2 margin
    is above bf16 rounding)."""
    spread = reference.std(dim=-1)
    top2 = reference.topk(2, dim=-1).values
    error = (logits - reference).abs().amax(dim=-1) / spread
    flipped = (logits.argmax(-1) != reference.argmax(-1)) & ((top2[:, 0] - top2[:, 1]) / spread > 2 * LOGITS_TOLERANCE)
    return error.max().item(), int(flipped.sum())


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


def overlap_generations(folder, tp_size: int = 1) -> str:
    """Stage 10 with and without the overlap schedule: the same kernels, so the same tokens."""
    batch = prompts(24, seed=8)
    outputs = {}
    for disable in (False, True):
        with Stage10(model_path=str(folder), device="cuda", dtype="bfloat16", tp_size=tp_size,
                     disable_overlap_schedule=disable, cuda_graph_max_bs=32, chunked_prefill_size=256) as engine:
            outputs[disable] = [o.token_ids for o in engine.generate_batch(batch, max_tokens=32, temperature=0)]
    same = sum(a == b for a, b in zip(outputs[False], outputs[True]))
    return f"{same}/{len(batch)} requests token-identical with and without overlap (EOS on, chunked prefill)"


def check_kind(kind: str, folder: Path) -> int:
    """The checks of one checkpoint kind; returns how many failed."""
    failures = 0
    with Engine(model_path=str(folder), device="cuda", dtype="float32") as engine:
        ok = engine.runner.graphs is None
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {kind:<6} fp32 runs eagerly (the flash kernel is bf16/fp16 only)", flush=True)
    with Engine(model_path=str(folder), device="cuda", dtype="bfloat16", cuda_graph_max_bs=32, **serial_schedule()) as engine:
        for batch_size in (1, 5, 32):
            ok, detail = teacher_forced(engine, batch_size)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {kind:<6} bf16 teacher-forced decode, batch {batch_size:>2}: {detail}", flush=True)
    print(f"info {kind:<6} bf16 greedy: {generations(folder)}", flush=True)
    print(f"info {kind:<6} bf16 greedy, stage 10: {overlap_generations(folder)}", flush=True)
    if torch.cuda.device_count() >= 2:
        print(f"info {kind:<6} bf16 greedy tp=2: {generations(folder, tp_size=2)}", flush=True)
        print(f"info {kind:<6} bf16 greedy tp=2, stage 10: {overlap_generations(folder, tp_size=2)}", flush=True)
    return failures


def use_stage(stage: str) -> None:
    """Check ``stage``'s engine (its settings, its batches) instead of stage 09's."""
    global Engine, EngineArgs, ForwardBatch
    Engine = importlib.import_module(stage).Engine
    EngineArgs = importlib.import_module(f"{stage}.engine_args").EngineArgs
    ForwardBatch = importlib.import_module(f"{stage}.forward_batch").ForwardBatch


def serial_schedule() -> dict:
    """Teacher-forced steps read each step's tokens before building the next: no overlap schedule."""
    settings = {field.name for field in dataclasses.fields(EngineArgs)}
    return {"disable_overlap_schedule": True} if "disable_overlap_schedule" in settings else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_graph_check")
    parser.add_argument("tokenizer_folder")
    parser.add_argument("--stage", default="stage09_cuda_graph")
    args = parser.parse_args(argv)
    tokenizer_folder = args.tokenizer_folder
    use_stage(args.stage)
    failures = 0
    with tempfile.TemporaryDirectory() as root:
        for kind in ("dense", "moe", "llama"):
            folder = write_checkpoint(kind, Path(root) / kind, Path(tokenizer_folder))
            try:
                failures += check_kind(kind, folder)
            except Exception as error:  # noqa: BLE001 - report, and go on with the other kinds
                failures += 1
                where = traceback.extract_tb(error.__traceback__)[-1]
                print(f"FAIL {kind:<6} {type(error).__name__}: {str(error).splitlines()[0]} "
                      f"({Path(where.filename).name}:{where.lineno})", flush=True)
    folder = random_checkpoint("qwen3-0.6b")
    with Engine(model_path=str(folder), device="cuda", dtype="bfloat16") as engine:
        graphs = engine.runner.graphs
        print(f"info qwen3-0.6b start-up: {len(graphs.graphs)} graphs (bs {graphs.batch_sizes[0]}..{graphs.max_bs}) "
              f"in {graphs.capture_seconds:.1f} s, {graphs.memory_bytes / 2**20:.0f} MiB", flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
