"""Attention for prompt chunks and extends, per layer on the GPU: keys read in place against gathered.

    python -m benchmarks.extend_attention [--case SEQS,PREFIX,NEW ...] [--out FILE]

Each case is ``SEQS`` sequences that each feed ``NEW`` tokens after a cached
prefix of ``PREFIX`` tokens (0: a fresh prompt), with Qwen3-0.6B's shapes (16
query heads, 8 KV heads of 128, bf16, pages of 16). Each sequence's pages come
from stage 12's allocator as requests that grew side by side, so each is one
run. One layer's attention through the two backends, eagerly, as the engine
runs such steps:

* ``gather``: every key of every sequence copied into one packed buffer, then
  one causal flash call (stages 02-11);
* ``runs``: the same causal call over the pool in place, each sequence its
  run's start and length (stage 12);
* ``split`` (cases of at most a page of new tokens, a verify's size): stage 14's
  verify graph attention, the cached prefix (a KV head's query heads sharing
  each key) and the new tokens (causally) apart, merged by log-sum-exp.

Both write the new K/V into the pool first, as the engine does. Times are the
median of interleaved repeats (each the mean of ``--calls`` calls); the error
is the largest difference between an output and the gather path's.
"""

import argparse
import math
import statistics
from types import SimpleNamespace

import torch

from benchmarks.attention_runs import HEAD_DIM, HEADS, KV_HEADS, PAGE, one_layer_pool, report, time_ms, write_report
from stage12_inplace_attention.attention_backend import ATTENTION_BACKENDS
from stage12_inplace_attention.forward_batch import ForwardBatch
from stage12_inplace_attention.kv_cache import DevicePageTables
from stage12_inplace_attention.page_allocator import PageAllocator

# (sequences, cached prefix, new tokens): a fresh prompt, later chunks of a long one, prefix-cache
# hits in a batch (multi-turn), and verify-sized extends.
CASES = [(1, 0, 2048), (1, 0, 16384), (1, 2048, 2048), (1, 14336, 2048), (4, 4096, 4096), (8, 1800, 200),
         (64, 1800, 200), (64, 512, 5)]


def extend_step(seqs: int, prefix: int, new: int, device: torch.device):
    """Pool, tables and the two ForwardBatches (runs / gather) of one extend step."""
    pages = math.ceil((prefix + new) / PAGE)
    num_pages = 2 * seqs * pages + 16
    pool = one_layer_pool(num_pages, device)
    tables = DevicePageTables(seqs, pages, device)
    allocator, updates = PageAllocator(num_pages), ([], [], [])
    prefix_pages = math.ceil(prefix / PAGE)  # requests that grew side by side, then each its new pages
    layouts = [allocator.alloc_pages(prefix_pages, expected=pages) for _ in range(seqs)]
    layouts = [table + allocator.alloc_pages(pages - len(table), after=table[-1] if table else None) for table in layouts]
    requests = []
    for row, table in enumerate(layouts):
        request = SimpleNamespace(page_table=table, table_row=row)
        tables.take_row(request)
        tables.pending_updates(request, *updates)
        requests.append(request)
    tables.apply(*(torch.tensor(u, device=device) for u in updates))
    rows, seq_lens, new_lengths = list(range(seqs)), [prefix + new] * seqs, [new] * seqs
    positions = [p for _ in rows for p in range(prefix, prefix + new)]
    runs = ATTENTION_BACKENDS["runs"](pool, tables).batch_runs(requests, seq_lens, new_lengths)
    common = (device, [0] * len(positions), positions, rows, new_lengths, seq_lens, [], ([], [], []))
    return pool, tables, ForwardBatch.build(*common, runs), ForwardBatch.build(*common), runs[0]


def measure(seqs: int, prefix: int, new: int, repeats: int, calls: int) -> dict:
    device = torch.device("cuda")
    pool, tables, runs_batch, gather_batch, slots = extend_step(seqs, prefix, new, device)
    gen = torch.Generator(device).manual_seed(0)
    tokens = seqs * new
    q = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    calls_by_name = {}
    for name, step in (("runs", runs_batch), ("gather", gather_batch)):
        backend = ATTENTION_BACKENDS[name](pool, tables)
        calls_by_name[name] = lambda backend=backend, step=step: backend.prepare(step)(0, q, k, v)  # plan + one layer
    if new <= PAGE and slots == 1:
        calls_by_name["split"] = lambda: verify_split(pool, tables, runs_batch, new)(0, q, k, v)
    outputs = {name: fn() for name, fn in calls_by_name.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in calls_by_name}
    for _ in range(repeats):  # interleaved
        for name, fn in calls_by_name.items():
            times[name].append(time_ms(fn, calls))
    error = {name: (out.float() - outputs["gather"].float()).abs().max().item() for name, out in outputs.items()}
    result = dict(seqs=seqs, prefix=prefix, new=new, runs_per_seq=slots, max_abs_error=round(error["runs"], 5))
    if "split" in outputs:
        result["split_max_abs_error"] = round(error["split"], 5)
    for name, values in times.items():
        result[f"{name}_ms"] = round(statistics.median(values), 4)
        result[f"{name}_ms_runs"] = [round(t, 4) for t in values]
    result["gather_over_runs"] = round(result["gather_ms"] / result["runs_ms"], 3)
    if "split" in outputs:
        result["runs_over_split"] = round(result["runs_ms"] / result["split_ms"], 3)
    return result


def verify_split(pool, tables, batch, width: int):
    """Stage 14's verify graph attention for this batch, eagerly: the new K/V written, then the split call."""
    from stage14_speculative.page_runs import PageRunsExtend, VerifyRunAttention

    step = PageRunsExtend(pool, tables.table, batch)
    step.attention = VerifyRunAttention(batch.run_starts, batch.run_lens, width, batch.sizes.max_run_len)
    return step


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extend_attention")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls timed together in one repeat")
    parser.add_argument("--case", action="append", default=[], metavar="SEQS,PREFIX,NEW", help="only these cases (repeatable)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = []
    cases = [tuple(map(int, case.split(","))) for case in args.case] or CASES
    for seqs, prefix, new in cases:
        report(measure(seqs, prefix, new, args.repeats, args.calls), results)
    write_report(args.out, results)
    return results


if __name__ == "__main__":
    main()
