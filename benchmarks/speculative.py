"""Speculative decoding (stage 14): what a verify costs, and what it gains end to end.

    python -m benchmarks.speculative end-to-end [--model builtin] [--device cpu] [--repeat 3] [--out FILE]
    python -m benchmarks.speculative verify-step --model qwen3-0.6b --device cuda [--out FILE]

``end-to-end``: one request at a time (batch 1), greedy, on prompts whose
answers copy much of the prompt (rewriting code, repeating a passage, a
list that continues): stage 13 against stage 14 with NGRAM drafts, repeated
and interleaved. Reported: output tok/s (the median run), target forwards,
the mean accept length, and whether the texts are identical.

``verify-step``: the target forward of one step for ``bs`` requests at a
context of ``--context`` tokens, feeding each its newest token and ``k``
guesses (k = 0 is a plain decode step): the engine's whole step (launch,
sampling or verification, reading the tokens), the median of ``--iters``
runs, as it runs (decode and verify from their CUDA graphs) and eagerly. From
a measured accept length ``a`` (tokens per verify), the speed-up of a step
is ``a * t_decode / t_verify``. ``--profile`` also counts, over ten graph-replayed
steps under torch.profiler, the kernels a step launches and the GPU time they
take (where a verify spends what a decode step does not).
"""

import argparse
import functools
import json
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.__main__ import environment, resolve_model
from benchmarks.step_profile import kernel_count, kernel_time_us

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
PASSAGE = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
           "To be or not to be, that is the question.")
ASKS = [f"Rewrite this Python code with type hints:\n\n```python\n{CODE}```",
        f"Rename the function add to plus in this code and print the whole code:\n\n{CODE}",
        f"Repeat this text exactly, word for word:\n\n{PASSAGE}"]
LIST = "1. apple\n2. banana\n3. cherry\n1. apple\n2. banana\n3. cherry\n1. apple\n2."


def end_to_end(args) -> dict:
    from stage13_structured import Engine as Stage13
    from stage14_speculative import Engine as Stage14

    model_path, _ = resolve_model(args.model, args.device)
    common = dict(model_path=model_path, device=args.device)
    systems = {"stage13_structured": Stage13(**common),
               "stage14_speculative NGRAM": Stage14(speculative_algorithm="NGRAM",
                                                    speculative_num_draft_tokens=args.draft_tokens, **common)}
    template = next(iter(systems.values())).tokenizer.apply_chat_template
    prompts = [template(ask) for ask in ASKS] + [LIST]
    runs = {name: [] for name in systems}
    texts = {}
    for repeat in range(args.repeat + 1):  # the first round warms up and is not counted
        for name, engine in systems.items():
            start, outs = time.perf_counter(), [engine.generate(p, max_tokens=args.max_tokens, temperature=0) for p in prompts]
            seconds = time.perf_counter() - start
            texts[name] = [o.token_ids for o in outs]
            if repeat:
                tokens = sum(o.completion_tokens for o in outs)
                verifies = sum(getattr(o, "spec_verify_ct", 0) for o in outs)  # (stage 13 has no such field)
                verified = sum(round(o.spec_verify_ct * o.spec_accept_length) for o in outs) if verifies else 0
                runs[name].append(dict(seconds=seconds, output_tokens=tokens, output_tokens_per_s=tokens / seconds,
                                       target_forwards=tokens - verified + verifies,
                                       accept_length=verified / verifies if verifies else None))
    for engine in systems.values():
        engine.shutdown()
    results = []
    for name, name_runs in runs.items():
        median = sorted(name_runs, key=lambda r: r["output_tokens_per_s"])[len(name_runs) // 2]
        results.append(dict(system=name, **median, runs=[round(r["output_tokens_per_s"], 2) for r in name_runs]))
    base = results[0]["output_tokens_per_s"]
    for r in results:
        r["speed_vs_stage13"] = round(r["output_tokens_per_s"] / base, 3)
    same = len({json.dumps(t) for t in texts.values()}) == 1
    return dict(environment=environment(), model=args.model, device=args.device, prompts=len(prompts),
                max_tokens=args.max_tokens, draft_tokens=args.draft_tokens, identical_tokens=same, results=results)


def verify_step(args) -> dict:
    from stage14_speculative import Engine

    model_path, _ = resolve_model(args.model, args.device)
    engine = Engine(model_path=model_path, device=args.device, speculative_algorithm="NGRAM",
                    kv_cache_bytes=args.kv_cache_bytes, cuda_graph_max_bs=max(args.batch_sizes))
    runner, rng = engine.runner, random.Random(0)
    vocab = engine.config.vocab_size
    results = []
    for bs in args.batch_sizes:
        ids = [engine.add_request([rng.randrange(vocab) for _ in range(args.context)], max_tokens=1024, temperature=0,
                                  ignore_eos=True) for _ in range(bs)]
        requests = [engine._by_id[i] for i in ids]
        engine.speculator.drafter.propose = lambda reqs, limits: [[] for _ in reqs]  # prefill and one decode, no guesses
        while any(not r.output_ids for r in requests):
            engine.step()
        for k in args.guesses:
            step = functools.partial(one_step, runner, requests, k, rng, vocab)
            step_ms = timed(step, args.iters)
            profiled = profiled_step(step) if args.profile else {}
            graphs, runner.graphs = runner.graphs, None
            eager_ms = timed(step, args.iters)
            runner.graphs = graphs
            results.append(dict(batch=bs, guesses=k, step_ms=round(step_ms, 3), eager_step_ms=round(eager_ms, 3), **profiled))
            print(results[-1], flush=True)
        for i in ids:
            engine.abort_request(i)
            engine.get_output(i)
    engine.shutdown()
    for r in results:
        plain = next(p for p in results if p["batch"] == r["batch"] and p["guesses"] == 0)
        r["step_vs_decode"] = round(r["step_ms"] / plain["step_ms"], 3)
        r["eager_vs_decode"] = round(r["eager_step_ms"] / plain["step_ms"], 3)
    return dict(environment=environment(), model=args.model, device=args.device, context=args.context, results=results)


def one_step(runner, requests, k: int, rng, vocab: int) -> None:
    """Launch one step that feeds each request its newest token and ``k`` guesses, read it, and undo it."""
    for r in requests:
        r.draft = [rng.randrange(vocab) for _ in range(k)]
    starts = [r.num_cached for r in requests]
    runner.launch(requests, [1 + k] * len(requests)).tokens()
    restore(runner, requests, starts)


def restore(runner, requests, starts) -> None:
    for r, start in zip(requests, starts):
        r.pending_tokens, r.num_cached, r.draft = r.pending_tokens - 1, start, []  # launch counted its token
        runner.truncate_cache(r)


def profiled_step(step, steps: int = 10) -> dict:
    """Kernels (and copies) per step and the GPU time they take, over ``steps`` steps under torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return dict(kernels_per_step=round(kernel_count(prof) / steps, 1), gpu_ms_per_step=round(kernel_time_us(prof) / steps / 1000, 3))


def timed(fn, iters: int) -> float:
    """Median milliseconds of ``fn`` (after two warm-up calls), synchronised on CUDA."""
    times = []
    for i in range(iters + 2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speculative")
    sub = parser.add_subparsers(dest="command", required=True)
    e2e = sub.add_parser("end-to-end", help="batch 1, prompts whose answers copy the prompt: stage 13 vs NGRAM")
    e2e.add_argument("--model", default="builtin")
    e2e.add_argument("--device", default="cpu")
    e2e.add_argument("--repeat", type=int, default=3)
    e2e.add_argument("--max-tokens", type=int, default=96)
    e2e.add_argument("--draft-tokens", type=int, default=6, help="speculative_num_draft_tokens")
    e2e.add_argument("--out")
    step = sub.add_parser("verify-step", help="the cost of a step with k guesses against a plain decode step")
    step.add_argument("--model", default="qwen3-0.6b")
    step.add_argument("--device", default="cuda")
    step.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    step.add_argument("--guesses", type=int, nargs="+", default=[0, 2, 4, 8])
    step.add_argument("--context", type=int, default=512)
    step.add_argument("--iters", type=int, default=20)
    step.add_argument("--kv-cache-bytes", type=int, default=16 << 30)
    step.add_argument("--profile", action="store_true", help="also count kernels and GPU time per step (torch.profiler)")
    step.add_argument("--out")
    args = parser.parse_args(argv)
    report = end_to_end(args) if args.command == "end-to-end" else verify_step(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
