"""Run one workload on one system and measure it.

Systems: any stage folder (``stage01_core`` ...), ``hf-generate`` (transformers'
``generate`` with a static cache, the whole workload as one left-padded batch),
``hf-generate-batch`` (transformers' continuous-batching ``generate_batch``, which
gives every request the longest max_new_tokens) and ``hf-continuous-batching``
(the same engine fed as ours are: each request its own max_new_tokens).
Every run starts with a small warm-up so one-time costs (allocator, kernels) are not timed.
"""

import collections
import dataclasses
import gc
import importlib
import inspect
import json
import statistics
import time

import torch

from benchmarks.workloads import Workload
from common.sampling import SamplingParams


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def summarize(system: str, workload: Workload, seconds: float, device: str, ttft=(), itl=(), **extra) -> dict:
    """The metrics every system reports (latencies in milliseconds)."""
    ms = lambda v: None if v is None else round(v * 1000, 3)
    return dict(
        system=system,
        workload=workload.name,
        requests=len(workload.prompts),
        input_tokens=workload.input_tokens,
        output_tokens=workload.output_tokens,
        seconds=round(seconds, 3),
        output_tokens_per_s=round(workload.output_tokens / seconds, 2),
        total_tokens_per_s=round((workload.input_tokens + workload.output_tokens) / seconds, 2),
        ttft_median_ms=ms(statistics.median(ttft) if ttft else None),
        ttft_p99_ms=ms(percentile(list(ttft), 99)),
        itl_median_ms=ms(statistics.median(itl) if itl else None),
        itl_p99_ms=ms(percentile(list(itl), 99)),
        peak_memory_bytes=peak_memory(device),
        **extra,
    )


def run_stage(stage: str, model_path, workload: Workload, device: str, engine_kwargs: dict | None = None) -> dict:
    """Serve the workload with a stage's Engine.generate_batch (greedy, ignore_eos)."""
    engine_class = importlib.import_module(stage).Engine
    reset_peak_memory(device)  # the system run before must not hold memory this engine sizes its KV pool from
    engine = engine_class(model_path=model_path, device=device, **(engine_kwargs or {}))
    # Warm-up with the first prompt so one-time costs leave the timing. Only where the workload
    # says so does the prefix cache keep it (a server that has seen this system prompt before).
    engine.generate(workload.prompts[0], max_tokens=1, temperature=0, ignore_eos=True)
    if not workload.warm_cache and hasattr(engine, "flush_cache"):
        engine.flush_cache()
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in workload.max_tokens]
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    outputs = engine.generate_batch(workload.prompts, params)
    synchronize(device)
    seconds = time.perf_counter() - start
    assert [o.completion_tokens for o in outputs] == workload.max_tokens
    ttft = [o.token_times[0] - o.arrival_time for o in outputs]
    itl = [b - a for o in outputs for a, b in zip(o.token_times, o.token_times[1:])]
    cached = sum(o.cached_tokens for o in outputs)
    result = summarize(stage, workload, seconds, device, ttft, itl, prefix_cache_hit_rate=round(cached / workload.input_tokens, 4))
    graphs = getattr(engine.runner, "graphs", None)  # stage 09 on: what the CUDA graphs cost and served
    if graphs is not None:
        result.update(cuda_graphs=len(graphs.graphs), cuda_graph_capture_s=round(graphs.capture_seconds, 2),
                      cuda_graph_memory_bytes=graphs.memory_bytes, decode_steps_replayed=graphs.replays)
    engine.shutdown()
    return result


def run_long_prompt(stage: str, model_path, workload: Workload, device: str, engine_kwargs: dict | None = None) -> dict:
    """Decoders start; after a few steps the long prompt arrives. Report the longest gap
    between two tokens of a running decoder (the stall the long prefill causes) and peak memory.
    Needs the add_request / step loop (stage04 and later)."""
    engine = importlib.import_module(stage).Engine(model_path=model_path, device=device, **(engine_kwargs or {}))
    if not hasattr(engine, "add_request"):
        raise ValueError(f"{stage} has no add_request loop; long-prompt needs stage04_batching or later")
    engine.generate(workload.prompts[0][:16], max_tokens=4, temperature=0, ignore_eos=True)  # warm-up
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in workload.max_tokens]
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    decoders = [engine.add_request(p, s) for p, s in zip(workload.prompts[:-1], params[:-1])]
    for _ in range(8):  # let them reach steady decode
        engine.step()
    long_id = engine.add_request(workload.prompts[-1], params[-1])
    outputs = {}
    while len(outputs) < len(decoders) + 1:
        engine.step()
        for rid in decoders + [long_id]:
            if rid not in outputs and (out := engine.get_output(rid)) is not None:
                outputs[rid] = out
    synchronize(device)
    seconds = time.perf_counter() - start
    gaps = [b - a for rid in decoders for a, b in zip(outputs[rid].token_times, outputs[rid].token_times[1:])]
    itl = gaps
    result = summarize(stage, workload, seconds, device, [outputs[long_id].token_times[0] - outputs[long_id].arrival_time], itl,
                       longest_decode_gap_ms=round(max(gaps) * 1000, 3))
    engine.shutdown()
    return result


def run_multi_turn(stage: str, model_path, workload: Workload, device: str, engine_kwargs: dict | None = None) -> dict:
    """Serve the conversations turn by turn: a turn is sent once its conversation's answer before it is
    in, at most ``workload.in_flight`` conversations at a time, each one after its turn going to the
    back of the line. Needs the add_request / step loop (stage04 and later)."""
    engine = importlib.import_module(stage).Engine(model_path=model_path, device=device, **(engine_kwargs or {}))
    engine.generate(workload.prompts[0][:16], max_tokens=2, temperature=0, ignore_eos=True)  # warm-up
    engine.flush_cache()
    n = workload.conversations
    history, turn, line, running, outputs = [[] for _ in range(n)], [0] * n, collections.deque(range(n)), {}, []
    synchronize(device)
    start = time.perf_counter()
    while line or running:
        while line and len(running) < workload.in_flight:
            c = line.popleft()
            prompt = history[c] + workload.prompts[turn[c] * n + c]
            params = SamplingParams(max_tokens=workload.max_tokens[turn[c] * n + c], temperature=0, ignore_eos=True)
            running[engine.add_request(prompt, params)] = (c, prompt)
        engine.step()
        for rid in list(running):
            if (out := engine.get_output(rid)) is not None:
                c, prompt = running.pop(rid)
                history[c], turn[c] = prompt + out.token_ids, turn[c] + 1
                outputs.append(out)
                if turn[c] * n < len(workload.prompts):
                    line.append(c)
    synchronize(device)
    seconds = time.perf_counter() - start
    prompt_tokens, cached = sum(o.prompt_tokens for o in outputs), sum(o.cached_tokens for o in outputs)
    ttft = [o.token_times[0] - o.arrival_time for o in outputs]
    itl = [b - a for o in outputs for a, b in zip(o.token_times, o.token_times[1:])]
    tiers = {k: v for k, v in engine.stats().items() if k.startswith("hicache_")}
    result = summarize(stage, workload, seconds, device, ttft, itl, prompt_tokens=prompt_tokens,
                       prefix_cache_hit_rate=round(cached / prompt_tokens, 4), prefilled_tokens=prompt_tokens - cached,
                       **tiers)
    result["total_tokens_per_s"] = round((prompt_tokens + workload.output_tokens) / seconds, 2)
    engine.shutdown()
    return result


def _load_hf(model_folder, device: str, **kwargs):
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype, **kwargs).to(device).eval()


@torch.inference_mode()
def run_hf_generate(model_folder, workload: Workload, device: str) -> dict:
    """transformers ``generate``: one left-padded batch with a static cache, run to the longest output.

    generate has one max_new_tokens per call, so shorter requests ride along
    until the longest finishes; only the tokens each request asked for count.
    """
    model = _load_hf(model_folder, device)
    width = max(len(p) for p in workload.prompts)
    ids = torch.zeros(len(workload.prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(workload.prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    # disable_compile: measure eager, as our engines run; compiling would recompile per shape.
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static", disable_compile=True)
    model.generate(ids[:1, -8:].to(device), max_new_tokens=4, **kwargs)  # warm-up
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(workload.max_tokens), **kwargs)
    synchronize(device)
    return summarize("hf-generate", workload, time.perf_counter() - start, device)


@torch.no_grad()  # its manager writes to buffers made outside inference mode
def run_hf_generate_batch(model_folder, workload: Workload, device: str) -> dict:
    """transformers' continuous batching ``generate_batch`` (one max_new_tokens for all, as its API has)."""
    from transformers import GenerationConfig

    model = _load_hf(model_folder, device, attn_implementation="paged|sdpa")
    config = GenerationConfig(max_new_tokens=max(workload.max_tokens), do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch([workload.prompts[0][:8]], generation_config=config, max_new_tokens=4)  # warm-up
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    outputs = model.generate_batch(workload.prompts, generation_config=config)
    synchronize(device)
    produced = sorted(len(o.generated_tokens) for o in outputs.values())
    if len(outputs) != len(workload.prompts) or produced[0] < max(workload.max_tokens):
        raise RuntimeError(f"hf generate_batch finished {len(outputs)} of {len(workload.prompts)} requests")
    return summarize("hf-generate-batch", workload, time.perf_counter() - start, device)


@torch.no_grad()  # as above
def run_hf_continuous_batching(model_folder, workload: Workload, device: str, timeout_s: float = 3600) -> dict:
    """transformers' continuous batching fed fairly: every request added through
    ``ContinuousBatchingManager.add_request`` with its own max_new_tokens, as our engines get them."""
    from transformers import GenerationConfig

    model = _load_hf(model_folder, device, attn_implementation="paged|sdpa")
    config = GenerationConfig(max_new_tokens=max(workload.max_tokens), do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config, **_cpu_batching_config(workload, device))
    manager.start()
    try:
        _collect(manager, [manager.add_request(workload.prompts[0][:8], max_new_tokens=4)], timeout_s)  # warm-up
        reset_peak_memory(device)
        synchronize(device)
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=m) for p, m in zip(workload.prompts, workload.max_tokens)]
        produced = _collect(manager, ids, timeout_s)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=10)
    if [produced.get(i) for i in ids] != workload.max_tokens:
        raise RuntimeError(f"hf continuous batching produced {sum(produced.values())} of {workload.output_tokens} tokens")
    return summarize("hf-continuous-batching", workload, seconds, device)


def _cpu_batching_config(workload: Workload, device: str) -> dict:
    """On the CPU, transformers' batches sized for the workload: its default plans 8,192 tokens a
    step and an attention mask that size, which made three short requests take 15 s (a GPU keeps
    the defaults). Older transformers have no such setting: they get none."""
    import transformers

    if device != "cpu" or not hasattr(transformers, "ContinuousBatchingConfig"):
        return {}
    longest = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
    return {"continuous_batching_config": transformers.ContinuousBatchingConfig(
        max_batch_tokens=max(64, sum(len(p) for p in workload.prompts)), num_blocks=max(64, 4 * longest))}


def _collect(manager, request_ids: list[str], timeout_s: float) -> dict[str, int]:
    """Wait for the manager's requests; how many tokens each generated."""
    produced, deadline = {}, time.monotonic() + timeout_s
    while len(produced) < len(request_ids) and time.monotonic() < deadline:
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            produced[result.request_id] = len(result.generated_tokens)
    return produced


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word such as lpm


def accepted_kwargs(stage: str, engine_kwargs: dict | None) -> dict:
    """The engine options this stage understands (e.g. chunked_prefill_size only from stage05 on)."""
    if not engine_kwargs:
        return {}
    try:
        settings = {field.name for field in dataclasses.fields(importlib.import_module(f"{stage}.engine_args").EngineArgs)}
    except ModuleNotFoundError:  # a copy from before the settings object (a before/after run): Engine names them
        settings = set(inspect.signature(importlib.import_module(stage).Engine).parameters)
    return {k: v for k, v in engine_kwargs.items() if k in settings}


def run_system(system: str, model_path, model_folder, workload: Workload, device: str, engine_kwargs=None) -> dict:
    """Run one system. ``stage06_scheduling@schedule_policy=lpm`` adds engine options to one stage,
    so one run can compare settings of the same stage side by side."""
    if "@" in system:
        base, options = system.split("@", 1)
        extra = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in options.split("+"))}
        result = run_system(base, model_path, model_folder, workload, device, {**(engine_kwargs or {}), **extra})
        result["system"] = system
        return result
    if system == "hf-generate":
        return run_hf_generate(model_folder, workload, device)
    if system == "hf-generate-batch":
        return run_hf_generate_batch(model_folder, workload, device)
    if system == "hf-continuous-batching":
        return run_hf_continuous_batching(model_folder, workload, device)
    if system.startswith("stage") and system[5:7].isdigit():
        run = {"long-prompt": run_long_prompt, "multi-turn": run_multi_turn}.get(workload.name, run_stage)
        return run(system, model_path, workload, device, accepted_kwargs(system, engine_kwargs))
    raise ValueError(f"unknown system {system!r}: a stage folder name, hf-generate, hf-generate-batch "
                     "or hf-continuous-batching")
