"""LM programs in the style of SGLang's frontend benchmarks, run with ``run_batch`` against one by one.

    python -m benchmarks.lang_programs --model builtin --device cpu
    python -m benchmarks.lang_programs --model qwen3-0.6b --device cuda --programs 64

Four programs (lang/), each run for ``--programs`` inputs: few-shot multiple
choice with ``select``, branch-and-merge with ``fork``, a three-turn chat, and
JSON-like extraction with a regex. Each is timed run one program after another
(what hand-written sequential calls cost) and with ``run_batch`` (the programs
in threads, their requests in the same engine steps), on the same engine in
interleaved order after a warm-up. Reported: seconds, the speed-up, and the
share of prompt tokens the prefix cache served in the batched run.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import lang as sgl
from benchmarks.__main__ import environment, resolve_model

SHOTS = "".join(f"Question: what is {a} plus {b}?\nAnswer: {a + b}\n\n" for a, b in [(2, 3), (7, 1), (4, 4), (9, 6)])


@sgl.function
def multiple_choice(s, question, choices):
    s += SHOTS + f"Question: {question}\nAnswer:"
    s += sgl.select("answer", choices=choices)


@sgl.function
def branch_and_merge(s, topic, tokens):
    s += f"Here are three short ideas about {topic}.\n"
    forks = s.fork(3)
    for i, fork in enumerate(forks):
        fork += f"Idea {i + 1}:"
    forks += sgl.gen("idea", max_tokens=tokens, temperature=0, ignore_eos=True)
    s += "".join(f"Idea {i + 1}:{f['idea']}\n" for i, f in enumerate(forks.join())) + "The best one is"
    s += sgl.gen("verdict", max_tokens=tokens, temperature=0, ignore_eos=True)


@sgl.function
def three_turns(s, name, tokens):
    s += sgl.system("You are a helpful assistant.")
    for turn in ("Hello, I am {name}.", "What is my name?", "Say it backwards."):
        s += sgl.user(turn.format(name=name))
        s += sgl.assistant(sgl.gen(f"reply{len(s.messages())}", max_tokens=tokens, temperature=0, ignore_eos=True))


@sgl.function
def extract(s, text, tokens):
    s += f"Text: {text}\nThe year in the text, as JSON: "
    s += sgl.gen("json", max_tokens=tokens, temperature=0, regex=r'\{"year": [0-9]{4}\}')


def inputs(program, count: int, tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if program is multiple_choice:
        return [dict(question=f"what is {a} plus {b}?", choices=[f" {a + b}", f" {a + b + 1}", f" {a * b}"])
                for a, b in ((rng.randint(1, 50), rng.randint(1, 50)) for _ in range(count))]
    if program is branch_and_merge:
        return [dict(topic=rng.choice(["rivers", "bread", "stars", "glass", "trains"]) + f" #{i}", tokens=tokens)
                for i in range(count)]
    if program is three_turns:
        return [dict(name=rng.choice(["Ada", "Linus", "Grace", "Alan"]) + str(i), tokens=tokens) for i in range(count)]
    return [dict(text=f"The bridge opened in {rng.randint(1800, 2020)} after years of work.", tokens=tokens)
            for _ in range(count)]


def measure(program, args_list: list[dict], backend, batched: bool) -> tuple[float, float]:
    """Seconds, and the prefix cache's share of the prompt tokens (from each gen's meta info)."""
    start = time.perf_counter()
    states = (program.run_batch(args_list, backend=backend, num_threads=len(args_list)) if batched
              else [program.run(backend=backend, **a) for a in args_list])
    seconds = time.perf_counter() - start
    metas = [m for s in states for m in s.meta.values() if "prompt_tokens" in m]
    prompt = sum(m["prompt_tokens"] for m in metas)
    return seconds, (sum(m["cached_tokens"] for m in metas) / prompt if prompt else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lang_programs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stage", default="stage19_pipeline_parallel")
    parser.add_argument("--programs", type=int, default=8, help="inputs per program")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per gen")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import importlib

    model_path, _ = resolve_model(args.model, args.device)
    engine = importlib.import_module(args.stage).Engine(model_path=model_path, device=args.device)
    backend = sgl.EngineBackend(engine)
    programs = [multiple_choice, branch_and_merge, three_turns]
    if "regex" in backend.sampling_fields:
        programs.append(extract)
    results = []
    for program in programs:
        args_list = inputs(program, args.programs, args.tokens, seed=0)
        measure(program, inputs(program, 2, args.tokens, seed=99), backend, batched=True)  # warm-up
        engine.flush_cache()  # each side starts from an empty prefix cache
        sequential, _ = measure(program, args_list, backend, batched=False)
        engine.flush_cache()
        batched, cached = measure(program, args_list, backend, batched=True)
        results.append(dict(program=program.__name__, programs=len(args_list), sequential_s=round(sequential, 3),
                            run_batch_s=round(batched, 3), speedup=round(sequential / batched, 2),
                            cached_share_run_batch=round(cached, 3)))
        print(json.dumps(results[-1]), flush=True)
    engine.shutdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(environment=environment(), model=args.model, stage=args.stage,
                                            tokens_per_gen=args.tokens, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
