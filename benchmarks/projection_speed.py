"""How fast a batch-1 projection of Qwen3-0.6B runs on this GPU, spelled four ways.

A decode step at batch 1 multiplies one row by each weight matrix, so its
floor is reading the weights once. This replays each spelling 50 times inside
a CUDA graph (no launch cost) and prints microseconds per call beside that
floor, under each BLAS library torch can prefer:

    python -m benchmarks.projection_speed

On the H100 every spelling and library ran the same kernels at the same speed
(about 2x the floor for the layer's four projections); the figures are quoted on
the stage 09 page.
"""

import torch
import torch.nn.functional as F

# (output features, input features) of each projection of Qwen3-0.6B.
SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024),
          "down_proj": (1024, 3072), "lm_head": (151936, 1024)}
REPLAYS_PER_GRAPH = 50


def microseconds_per_call(fn) -> float:
    """Record ``fn`` REPLAYS_PER_GRAPH times in one graph, replay it 10 times, time it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the main stream, as graph capture needs
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS_PER_GRAPH):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (10 * REPLAYS_PER_GRAPH)


def main() -> None:
    bandwidth = 3.35e12  # bytes/s: the H100 SXM's HBM3 (scale the floor for another GPU)
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for name, (n, k) in SHAPES.items():
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            weight_t = weight.t().contiguous()
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            spellings = {"F.linear": lambda x=x, w=weight: F.linear(x, w),
                         "torch.mv": lambda x=x, w=weight: torch.mv(w, x[0]),
                         "x @ W.T stored": lambda x=x, w=weight_t: x @ w}
            floor = weight.numel() * weight.element_size() / bandwidth * 1e6
            times = "  ".join(f"{s} {microseconds_per_call(fn):6.1f}" for s, fn in spellings.items())
            print(f"{library:9s} {name:13s} weight-read floor {floor:6.1f} us   {times}", flush=True)


if __name__ == "__main__":
    main()
