"""Stage 17's tier copies on a GPU: bit-exact, and how close to the link's bandwidth.

    python -m benchmarks.gpu_hicache_check [--pages 1024] [--out FILE]

A Qwen3-0.6B-shaped device pool (bf16, 16-token pages) is filled with random
values. Scattered device pages are written to pinned host memory while the
step stream is busy with matmuls, their device pages are overwritten (as a
reused page would be), then loaded back into other scattered pages, again
beside busy matmuls. The loaded pages must equal the originals bit for bit,
both from one run of host pages and from scattered host pages. Then it times
loads of the same bytes, medians of interleaved repeats: the controller's
from one run of host pages (one copy across), from host pages in random order
(a copy per page), page by page and layer by layer (a copy each), and a plain
pinned-to-device copy (the link's bandwidth, the ceiling).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.__main__ import environment
from stage17_hicache.cache_controller import HiCacheController
from stage17_hicache.host_kv_pool import HostKVPool
from stage17_hicache.kv_cache import PagedKVPool

QWEN3_06B = dict(num_hidden_layers=28, num_key_value_heads=8, head_dim=128)


def busy(device: torch.device) -> None:
    """Queue a few milliseconds of matmuls on the current stream (a running step)."""
    if device.type == "cuda":
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        for _ in range(20):
            a = a @ a * 1e-3


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn`` takes, device work included."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_hicache_check")
    parser.add_argument("--pages", type=int, default=1024, help="pages moved each way")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    pool = PagedKVPool(SimpleNamespace(**QWEN3_06B), 4 * args.pages, 16, device, dtype)  # the pool reads only these
    pool.k.normal_(), pool.v.normal_()
    host = HostKVPool(pool, 2 * args.pages)
    controller = HiCacheController(pool, host, None)
    order = torch.randperm(4 * args.pages).tolist()
    source, target = order[: args.pages], order[args.pages : 2 * args.pages]
    slots = lambda pages: controller.slots(pages, device)
    keep_k, keep_v = pool.k[:, slots(source)].clone(), pool.v[:, slots(source)].clone()

    one_run, scattered = list(range(args.pages)), torch.randperm(2 * args.pages)[: args.pages].tolist()
    exact = True
    for host_pages in (one_run, scattered):
        pool.k[:, slots(source)], pool.v[:, slots(source)] = keep_k, keep_v
        busy(device)
        controller.write(source, host_pages)
        pool.k[:, slots(source)] = 0  # the pages are reused at once: the write must have read them first
        pool.v[:, slots(source)] = 0
        busy(device)
        controller.load(host_pages, target)
        exact &= bool(torch.equal(pool.k[:, slots(target)], keep_k) and torch.equal(pool.v[:, slots(target)], keep_v))

    nbytes = 2 * keep_k.numel() * keep_k.element_size()
    staged = host.kv[: args.pages]  # the same bytes in one block of pinned memory
    page = 16

    def page_by_page():
        for h, d in enumerate(target):
            for layer in range(pool.k.shape[0]):
                pool.k[layer, d * page : (d + 1) * page].copy_(host.kv[h, 0, layer], non_blocking=True)
                pool.v[layer, d * page : (d + 1) * page].copy_(host.kv[h, 1, layer], non_blocking=True)

    ways = {
        "load_one_run": lambda: controller.load(one_run, target),
        "load_scattered": lambda: controller.load(scattered, target),
        "page_by_page": page_by_page,
        "link_copy": lambda: staged.to(device, non_blocking=True),
    }
    seconds = {name: [] for name in ways}
    for _ in range(args.repeat):
        for name, fn in ways.items():
            seconds[name].append(timed(fn, device))
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    report = dict(environment=environment(), pages=args.pages, bytes=nbytes, bit_exact_round_trip=exact,
                  **{f"{name}_ms": round(s * 1000, 3) for name, s in medians.items()},
                  **{f"{name}_gb_per_s": round(nbytes / s / 1e9, 2) for name, s in medians.items()})
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
