"""Structured outputs (stage 13): what a grammar costs a step, and what jump-forward saves.

    python -m benchmarks.structured [--model builtin|qwen3-0.6b] [--device cpu|cuda] [--repeat 3] [--out FILE]

Half the requests of a random workload carry a JSON schema (bounded strings,
integers and arrays, compact separators, so every answer ends by its
grammar); the other half are free. Runs of the same prompts, repeated and
interleaved:

* ``half JSON``: as described, jump-forward on;
* ``half JSON, same lengths unconstrained``: no schema; every request
  generates exactly as many tokens as it did in a first, uncounted ``half
  JSON`` run (``max_tokens`` set to that count, ``ignore_eos``), so both runs
  produce the same tokens' worth of work. That first run is also the
  warm-up: the grammar compiles and every graph bucket the workload needs is
  recorded before anything is timed;
* ``all JSON`` and ``all JSON, no jump-forward``: every request carries the
  schema, with and without jump-forward: the forwards and time it saves.

Reported: output tok/s of each (the median run), forwards per run, and the
host time the grammars took per mask row (filling it, advancing the matcher,
computing forced tokens).
"""

import argparse
import json
import time

import torch

from benchmarks.__main__ import environment, resolve_model
from benchmarks.workloads import make_workload
from stage13_structured import Engine, SamplingParams, grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "city": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age", "tags", "city"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # compact JSON: no runs of whitespace
}
MAX_JSON_TOKENS = 256


class HostClock:
    """Wraps the grammar's host work (mask rows, accepting tokens, forced tokens) with a timer."""

    def __init__(self):
        self.seconds, self.rows = 0.0, 0
        self.originals = {name: getattr(grammar.RequestGrammar, name) for name in ("accept", "forced_tokens")}
        for name, method in self.originals.items():
            setattr(grammar.RequestGrammar, name, self._timed(method, rows=None))
        self.fill_masks = grammar.fill_masks
        grammar.fill_masks = self._timed(self.fill_masks, rows=lambda grammars, masks: len(grammars))

    def _timed(self, method, rows):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.rows += rows(*args) if rows else 0

        return timed

    def restore(self) -> None:
        for name, method in self.originals.items():
            setattr(grammar.RequestGrammar, name, method)
        grammar.fill_masks = self.fill_masks


def serve(engine, prompts, params) -> dict:
    forwards, launch = [0], engine.runner.launch

    def counted(requests, new_lengths):
        forwards[0] += 1
        return launch(requests, new_lengths)

    engine.runner.launch = counted
    clock = HostClock()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        outputs = engine.generate_batch(prompts, params)
    finally:
        clock.restore()
        engine.runner.launch = launch
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return dict(outputs=outputs, seconds=seconds, output_tokens=tokens, output_tokens_per_s=round(tokens / seconds, 1),
                forwards=forwards[0], grammar_host_us_per_row=round(clock.seconds / max(clock.rows, 1) * 1e6, 1),
                mask_rows=clock.rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model_path, _ = resolve_model(args.model, args.device)
    size = "gpu" if args.device.startswith("cuda") else "cpu"
    with Engine(model_path=model_path, device=args.device) as engine:
        workload = make_workload("random", size, engine.config.vocab_size, seed=0)
        prompts = workload.prompts
        schema = json.dumps(SCHEMA)
        json_params = SamplingParams(json_schema=schema, max_tokens=MAX_JSON_TOKENS, temperature=0)
        half = [json_params if i % 2 == 0 else SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                for i, n in enumerate(workload.max_tokens)]
        first = serve(engine, prompts, half)  # the warm-up, and the lengths the unconstrained run copies
        valid = sum(1 for o, p in zip(first["outputs"], half) if p.json_schema is None or _valid(o.text))
        same_lengths = [SamplingParams(max_tokens=max(len(o.token_ids), 1), temperature=0, ignore_eos=True)
                        for o in first["outputs"]]
        plan = [("half JSON, same lengths unconstrained", same_lengths, True), ("half JSON", half, True),
                ("all JSON", [json_params] * len(prompts), True), ("all JSON, no jump-forward", [json_params] * len(prompts), False)]
        runs = {name: [] for name, _, _ in plan}
        for _ in range(args.repeat):
            for name, params, jump in plan:
                engine.jump_forward = jump
                runs[name].append(serve(engine, prompts, params))
        engine.jump_forward = True
    results = []
    for name, done in runs.items():
        median = sorted(done, key=lambda r: r["output_tokens_per_s"])[(len(done) - 1) // 2]
        results.append(dict(system=name, **{k: v for k, v in median.items() if k != "outputs"},
                            output_tokens_per_s_runs=[r["output_tokens_per_s"] for r in done]))
    report = dict(environment=environment(), model=args.model,
                  workload=f"{workload.description}; every other request (or all) a JSON schema (max_tokens {MAX_JSON_TOKENS})",
                  valid_json=f"{valid}/{len(prompts)}", ratio_half_json_to_unconstrained=round(
                      results[1]["output_tokens_per_s"] / results[0]["output_tokens_per_s"], 3),
                  results=results)
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "output_tokens_per_s_runs"}), flush=True)
    print(json.dumps({k: report[k] for k in ("valid_json", "ratio_half_json_to_unconstrained")}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _valid(text: str) -> bool:
    """The answer follows SCHEMA (with jsonschema; where it is not installed, as on a bare GPU
    machine: a JSON object with every required key)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return isinstance(value, dict) and set(SCHEMA["required"]) <= set(value)
    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


if __name__ == "__main__":
    main()
