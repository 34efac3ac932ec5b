"""The benchmark workloads, seeded and described in one place.

Prompts are random token ids (the weights are random too for the real shapes),
so a workload is fully defined by its lengths. Each has a GPU size and a
scaled-down CPU size.
"""

import random
from dataclasses import dataclass


@dataclass
class Workload:
    """Requests to serve: prompt token ids and how many tokens each must generate (ignore_eos)."""

    name: str
    description: str
    prompts: list[list[int]]
    max_tokens: list[int]
    warm_cache: bool = False  # keep the warm-up prompt in the prefix cache (a system prompt seen before)
    # multi-turn: ``prompts`` are the user turns, conversation c's turn r at index r * conversations + c;
    # a turn's prompt is its conversation so far (earlier turns and answers) plus the turn.
    conversations: int = 0
    in_flight: int = 0  # multi-turn: conversations with a request running at once

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def _random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def random_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """nano-vllm's bench: 256 requests, input and output lengths uniform in 100..1024."""
    count, low, high = (256, 100, 1024) if size == "gpu" else (16, 10, 64)
    rng = random.Random(seed)
    prompts = [_random_prompt(rng, rng.randint(low, high), vocab_size) for _ in range(count)]
    return Workload(
        "random", f"{count} requests, input and output lengths uniform in {low}..{high}, ignore_eos",
        prompts, [rng.randint(low, high) for _ in range(count)],
    )


def single_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """Batch-1 decode latency: one prompt, a fixed number of new tokens."""
    prompt_len, new = (128, 256) if size == "gpu" else (32, 64)
    rng = random.Random(seed)
    return Workload("single", f"1 request, {prompt_len} prompt tokens, {new} new tokens",
                    [_random_prompt(rng, prompt_len, vocab_size)], [new])


def shared_prefix_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """Every prompt is 90% one shared system prompt / few-shot prefix, 10% its own question."""
    count, length, new = (64, 2000, 64) if size == "gpu" else (12, 200, 8)
    rng = random.Random(seed)
    shared = _random_prompt(rng, length * 9 // 10, vocab_size)
    prompts = [shared + _random_prompt(rng, length // 10, vocab_size) for _ in range(count)]
    return Workload("shared-prefix", f"{count} requests of {length} tokens, 90% shared prefix, {new} new tokens",
                    prompts, [new] * count, warm_cache=True)


def prefix_mix_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """Groups of requests sharing long prefixes, shuffled together."""
    groups, per_group, prefix, suffix, new = (8, 16, 1500, 100, 64) if size == "gpu" else (4, 4, 150, 10, 8)
    rng = random.Random(seed)
    prefixes = [_random_prompt(rng, prefix, vocab_size) for _ in range(groups)]
    prompts = [p + _random_prompt(rng, suffix, vocab_size) for p in prefixes for _ in range(per_group)]
    rng.shuffle(prompts)
    return Workload("prefix-mix", f"{groups} groups x {per_group} requests sharing {prefix}-token prefixes, shuffled",
                    prompts, [new] * len(prompts))


def long_prompt_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """Decoders running when one long prompt arrives (the last request); see run_long_prompt."""
    decoders, prompt_len, decode_new, long_len = (16, 128, 512, 8192) if size == "gpu" else (4, 16, 64, 1024)
    rng = random.Random(seed)
    prompts = [_random_prompt(rng, prompt_len, vocab_size) for _ in range(decoders)] + [_random_prompt(rng, long_len, vocab_size)]
    return Workload("long-prompt", f"{decoders} decoders, then a {long_len}-token prompt arrives",
                    prompts, [decode_new] * decoders + [4])


def prefill_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """Prompts alone: one output token each, so the run is (almost) all prefill; the harness
    reports model FLOPs utilisation for it on a GPU it knows the peak of."""
    count, length = (64, 2048) if size == "gpu" else (8, 128)
    rng = random.Random(seed)
    return Workload("prefill", f"{count} prompts of {length} tokens, 1 new token each",
                    [_random_prompt(rng, length, vocab_size) for _ in range(count)], [1] * count)


def multi_turn_workload(size: str, vocab_size: int, seed: int) -> Workload:
    """Chats that come back: each conversation opens with its own long context (a document, a system
    prompt), then asks again and again, each turn sent once the answer before it is in. A few
    conversations run at once; in between, the others' turns push its prefix out of a small device
    pool. (SGLang's bench_multiturn, with random tokens.)"""
    conversations, rounds, first, turn, new, in_flight = (48, 4, 2000, 200, 64, 8) if size == "gpu" else (6, 3, 96, 16, 4, 2)
    rng = random.Random(seed)
    prompts = [_random_prompt(rng, first if r == 0 else turn, vocab_size) for r in range(rounds) for _ in range(conversations)]
    return Workload("multi-turn", f"{conversations} conversations x {rounds} turns, each a {first}-token context then "
                    f"{turn}-token turns, {new} new tokens a turn, {in_flight} in flight", prompts, [new] * len(prompts),
                    conversations=conversations, in_flight=in_flight)


WORKLOADS = {
    "random": random_workload,
    "single": single_workload,
    "shared-prefix": shared_prefix_workload,
    "prefix-mix": prefix_mix_workload,
    "long-prompt": long_prompt_workload,
    "multi-turn": multi_turn_workload,
    "prefill": prefill_workload,
}


def make_workload(name: str, size: str, vocab_size: int, seed: int = 0, requests: int | None = None) -> Workload:
    """Build a workload; ``requests`` keeps only its first N requests (a scaled-down run)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    workload = WORKLOADS[name](size, vocab_size, seed)
    if requests is not None:
        workload.prompts, workload.max_tokens = workload.prompts[:requests], workload.max_tokens[:requests]
        workload.description += f" (first {len(workload.prompts)} requests)"
    return workload
