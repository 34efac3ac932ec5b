"""Decode attention per layer on the GPU: stage 12's page runs against the gather path.

    python -m benchmarks.attention_runs [--out FILE]

For each batch x context, one layer's KV pool with Qwen3-0.6B's shapes (16
query heads, 8 KV heads of 128, bf16), page tables filled by stage 12's own
allocator (prompts of half the context, then every request growing a page at
a time beside the others), and one decode step's attention through the
stage's two attention backends, each recorded in a CUDA graph:

* ``gather``: every key and value copied into one packed buffer, then flash
  (stages 02-11);
* ``runs``: each run of consecutive pages read in place, merged by log-sum-exp.

Also page tables cut into runs of a fixed number of pages at random places
(``--run-pages``; one page is the worst case: a fragmented pool) and the K/V
read floor: a graph that sums the same bytes once. Times are the
median of interleaved repeats; the error is the largest difference between
the two outputs.
"""

import argparse
import json
import math
import statistics
from types import SimpleNamespace

import torch

from stage12_inplace_attention.attention_backend import ATTENTION_BACKENDS
from stage12_inplace_attention.forward_batch import ForwardBatch
from stage12_inplace_attention.kv_cache import DevicePageTables, PagedKVPool
from stage12_inplace_attention.page_allocator import PageAllocator
from stage12_inplace_attention.page_runs import MAX_VIRTUAL_SEQUENCES, pack_runs, token_runs

PAGE, HEADS, KV_HEADS, HEAD_DIM = 16, 16, 8, 128
CASES = [(1, 1024), (1, 4096), (64, 866), (64, 4096), (128, 2048), (256, 866), (256, 4096)]


def page_tables(allocator: PageAllocator, batch: int, context: int, run_pages: int | None) -> list[list[int]]:
    """Each request's pages as the allocator hands them out while requests grow side by side, or
    (``run_pages``) as runs of that many pages at random places in the pool."""
    pages = math.ceil(context / PAGE)
    if run_pages:
        per_request = math.ceil(pages / run_pages)
        starts = torch.randperm(allocator.num_pages // run_pages, generator=torch.Generator().manual_seed(0)) * run_pages
        return [[int(start) + p for start in starts[i * per_request : (i + 1) * per_request] for p in range(run_pages)][:pages]
                for i in range(batch)]
    tables = [allocator.alloc_pages(pages // 2, expected=pages) for _ in range(batch)]
    for _ in range(pages - pages // 2):
        for table in tables:
            table += allocator.alloc_pages(1, after=table[-1])
    return tables


def one_layer_pool(num_pages: int, device: torch.device) -> PagedKVPool:
    """One layer's bf16 KV pool of Qwen3-0.6B's KV shapes, filled with random keys and values."""
    config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    pool = PagedKVPool(config, num_pages, PAGE, device, torch.bfloat16)
    pool.k.normal_()
    pool.v.normal_()
    return pool


def report(result: dict, results: list[dict]) -> None:
    """Print a case's medians (not every repeat) and keep it for the JSON report."""
    torch.cuda.empty_cache()  # the pool and graphs of this case are gone
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_runs")}), flush=True)
    results.append(result)


def write_report(path: str | None, results: list[dict]) -> None:
    """The JSON report: the card, torch, the shapes, every case."""
    if path:
        report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, page_size=PAGE,
                      shapes=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM), results=results)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def decode_step(batch: int, context: int, run_pages: int | None, device: torch.device):
    """Pool, tables and the two ForwardBatches (runs / gather) of one decode step."""
    pages = math.ceil(context / PAGE)
    num_pages = batch * pages * 2 + 16
    pool = one_layer_pool(num_pages, device)
    tables = DevicePageTables(batch, pages, device)
    updates = ([], [], [])
    for table in page_tables(PageAllocator(num_pages), batch, context, run_pages):
        request = SimpleNamespace(page_table=table)
        tables.take_row(request)
        tables.pending_updates(request, *updates)
    tables.apply(*(torch.tensor(u, device=device) for u in updates))
    rows, seq_lens = list(range(batch)), [context] * batch
    runs = pack_runs([token_runs(tables.runs[row], context, PAGE) for row in rows])
    common = (device, [0] * batch, [context - 1] * batch, rows, [1] * batch, seq_lens, rows, ([], [], []))
    return pool, tables, ForwardBatch.build(*common, runs), ForwardBatch.build(*common), runs[0]


def graph_of(fn):
    """Record ``fn`` in a CUDA graph (after a warm-up on a side stream); returns (graph, its output).
    Whatever the graph reads must outlive it: the caller keeps ``fn``'s tensors."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_ms(fn, calls: int = 50) -> float:
    """Mean GPU milliseconds of ``fn`` (a graph's ``replay``, or an eager call) over ``calls`` calls in a row."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def measure(batch: int, context: int, run_pages: int | None, repeats: int) -> dict:
    device = torch.device("cuda")
    pool, tables, runs_batch, gather_batch, slots = decode_step(batch, context, run_pages, device)
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(batch, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    graphs, plans = {}, {}  # the plans hold the index tensors the graphs read: they must stay alive
    for name, step in (("runs", runs_batch), ("gather", gather_batch)):
        plans[name] = ATTENTION_BACKENDS[name](pool, tables).prepare(step)
        graphs[name] = graph_of(lambda attention=plans[name]: attention(0, q, k, v))
    used = batch * context
    graphs["read floor"] = graph_of(lambda: pool.k[0, :used].sum(dtype=torch.float32) + pool.v[0, :used].sum(dtype=torch.float32))
    times = {name: [] for name in graphs}
    for _ in range(repeats):  # interleaved
        for name, (graph, _) in graphs.items():
            times[name].append(time_ms(graph.replay))
    error = (graphs["runs"][1].float() - graphs["gather"][1].float()).abs().max().item()
    result = dict(batch=batch, context=context, layout=f"runs of {run_pages} pages" if run_pages else "allocator",
                  runs_per_seq=slots, max_abs_error=round(error, 5))
    for name, values in times.items():
        result[f"{name.replace(' ', '_')}_ms"] = round(statistics.median(values), 4)
        result[f"{name.replace(' ', '_')}_ms_runs"] = [round(t, 4) for t in values]
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", action="append", default=[], metavar="BATCH,CONTEXT", help="only these cases (repeatable)")
    parser.add_argument("--run-pages", action="append", type=int, default=[],
                        help="also tables of runs of this many pages (repeatable; default: 1, a fragmented pool)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = []
    cases = [tuple(map(int, case.split(","))) for case in args.case] or CASES
    for batch, context in cases:
        for run_pages in [None] + (args.run_pages or [1]):
            if run_pages and batch * math.ceil(context / PAGE / run_pages) > MAX_VIRTUAL_SEQUENCES:
                continue  # more runs than the kernel takes: the engine gathers such a batch
            report(measure(batch, context, run_pages, args.repeats), results)
    write_report(args.out, results)
    return results


if __name__ == "__main__":
    main()
