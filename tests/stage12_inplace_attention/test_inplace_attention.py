"""Stage 12 end to end: attention over page runs (decode, prompt chunks, extends) gives the gather path's tokens.

``attention_backend="gather"`` is stage 11's attention (keys copied out of
their pages first), so it is the oracle here; ``"runs"`` is asked for by name,
since on the CPU the default is gather (``tests/ladder/test_runs_backend.py``
checks it in every later stage too). Each test also checks that the
case it is about really happened: steps ran over runs, sequences had several
runs, extends read cached prefixes in place, graphs were replayed, steps with
too many runs ran eagerly.
"""

import random

import pytest
import torch

from common.sampling import SamplingParams
from stage12_inplace_attention import Engine, page_runs
from stage12_inplace_attention.__main__ import build_parser
from stage12_inplace_attention.attention_backend import default_backend
from stage12_inplace_attention.cuda_graph_runner import CudaGraphRunner

KINDS = ["dense", "moe", "llama"]


def tokens(n, seed):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompts(count=8, seed=3, longest=40):
    rng = random.Random(seed)
    return [tokens(rng.randint(2, longest), seed * 100 + i) for i in range(count)]


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


class RunLog:
    """Wraps ``runner.forward``: the run slots of every decode step (0: no runs, gathered) in
    ``slots``, and of every step that fed a sequence several tokens in ``extends``, as
    (run slots, longest run, most new tokens of a sequence): (0, 0, n) gathered."""

    def __init__(self, engine):
        self.slots, self.extends = [], []
        forward = engine.runner.forward

        def logged(batch):
            sizes = batch.sizes
            if sizes.max_new_length == 1:
                self.slots.append(sizes.runs_per_seq)
            else:
                self.extends.append((sizes.runs_per_seq, sizes.max_run_len, sizes.max_new_length))
            return forward(batch)

        engine.runner.forward = logged

    def prefixes_read_in_place(self) -> bool:
        """Did a step read a cached prefix in place with its new tokens (a run longer than any chunk)?"""
        return any(slots and longest > new for slots, longest, new in self.extends)

    def extends_gathered(self) -> bool:
        return any(slots == 0 for slots, _, _ in self.extends)


def serve_rounds(engine, kind_seed=0):
    """Two rounds of a batch: the second extends the first's prompts, so prefixes come from the cache."""
    first = prompts(6, seed=7 + kind_seed)
    second = [p + q for p, q in zip(first, prompts(6, seed=8 + kind_seed))]
    return [[o.token_ids for o in engine.generate_batch(batch, greedy(12))] for batch in (first, second)]


@pytest.mark.parametrize("kind", KINDS)
def test_runs_give_the_gather_tokens_with_prefixes_from_the_cache(kind, checkpoints, monkeypatch):
    monkeypatch.setattr(page_runs, "MIN_TOKENS_PER_RUN", 0)  # these short runs too are read in place
    kwargs = dict(model_path=str(checkpoints[kind]), device="cpu", page_size=4, chunked_prefill_size=16)
    with Engine(attention_backend="gather", **kwargs) as engine:
        expected = serve_rounds(engine)
    with Engine(attention_backend="runs", **kwargs) as engine:
        log = RunLog(engine)
        assert serve_rounds(engine) == expected
        assert max(log.slots) >= 2  # cached prefix pages and a request's own pages: two runs, merged
        assert log.prefixes_read_in_place()  # a prompt's later chunks: one run with the chunks before
        engine.flush_cache()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


def fragment(engine) -> list[int]:
    """Take every other page of the pool, so every request's pages are one-page runs."""
    allocator = engine.runner.allocator
    held = allocator.alloc_pages(allocator.num_pages)
    allocator.free_pages(held[::2])
    return held[1::2]


@pytest.mark.parametrize("short_runs", ["read in place", "gathered"])
def test_a_fragmented_pool_gives_the_same_tokens(short_runs, checkpoints, monkeypatch):
    """One-page runs, read one by one and merged; by default such short runs are gathered instead.
    A prompt chunk over several runs always gathers."""
    if short_runs == "read in place":
        monkeypatch.setattr(page_runs, "MIN_TOKENS_PER_RUN", 0)
    kwargs = dict(model_path=str(checkpoints["dense"]), device="cpu", page_size=4, kv_cache_bytes=1 << 20,
                  chunked_prefill_size=8)  # a prompt's later chunks extend a fragmented prefix
    with Engine(attention_backend="gather", **kwargs) as engine:
        expected = [o.token_ids for o in engine.generate_batch(prompts(5), greedy(16))]
    with Engine(attention_backend="runs", **kwargs) as engine:
        held = fragment(engine)
        log = RunLog(engine)
        assert [o.token_ids for o in engine.generate_batch(prompts(5), greedy(16))] == expected
        if short_runs == "read in place":
            assert max(log.slots) >= 8  # sequences of 9 or more one-page runs
        else:
            assert set(log.slots) == {0}  # every decode step gathered
        assert log.extends_gathered() and not log.prefixes_read_in_place()
        engine.runner.allocator.free_pages(held)
        engine.flush_cache()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


def test_a_request_is_one_run_when_the_pool_allows(checkpoints):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=4, disable_radix_cache=True) as engine:
        for prompt in prompts(8, longest=30):
            engine.add_request(prompt, max_tokens=40, temperature=0, ignore_eos=True)
        steps = 0
        while engine.scheduler.running or engine.scheduler.waiting:
            engine.step()
            tables = engine.runner.page_tables
            assert all(len(tables.runs[r.table_row]) == 1 for r in engine.scheduler.running)
            steps += 1
        assert steps > 40


def attach_graphs(engine, max_bs: int) -> list[tuple[int, int, int]]:
    """Uncaptured decode graphs over runs (the CPU runs their forward directly); returns the buckets replayed."""
    runner = engine.runner
    runner.graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages,
                                    max_bs, runner.config.max_position_embeddings, capture=False)
    used, run = [], runner.graphs.run

    def counting_run(batch, bucket):
        if bucket.runs_per_seq and bucket not in runner.graphs.graphs:
            recorded = runner.graphs.graph_for(bucket).attention
            recorded.run_starts.fill_(5)  # junk in the graph's run buffers: run() must overwrite what it uses
            recorded.run_lens.fill_(5)
        used.append(bucket)
        return run(batch, bucket)

    runner.graphs.run = counting_run
    return used


def test_start_up_records_one_and_two_runs_per_sequence_for_every_batch(checkpoints):
    """Two runs per sequence is common once finished requests have scattered the free pages; a
    graph recorded mid-serving holds up a whole step, so start-up records those too. One
    sequence keeps its gather graph."""
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", attention_backend="runs") as engine:
        runner = engine.runner
        graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 16, 512,
                                 capture=False)
        graphs.capture_all(progress=False)
    recorded = {(key.batch_size, key.runs_per_seq) for key in graphs.graphs}
    assert recorded == {(1, 0)} | {(bs, runs) for bs in graphs.batch_sizes if bs > 1 for runs in (1, 2)}


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_over_runs_give_the_eager_tokens(kind, checkpoints, monkeypatch):
    """Graphs keyed by run slots, with padding rows; rows with more runs than a graph has slots run eagerly."""
    monkeypatch.setattr(page_runs, "MAX_RUNS_PER_SEQ", 4)
    monkeypatch.setattr(page_runs, "MIN_TOKENS_PER_RUN", 0)  # short runs too are read in place
    kwargs = dict(model_path=str(checkpoints[kind]), device="cpu", page_size=4, kv_cache_bytes=1 << 20)
    params = [greedy(m) for m in (3, 5, 8, 12, 10, 2, 11)]
    with Engine(attention_backend="gather", **kwargs) as engine:
        expected = [o.token_ids for o in engine.generate_batch(prompts(7, longest=12), params)]
    with Engine(attention_backend="runs", **kwargs) as engine:
        held = fragment(engine)  # runs grow a page at a time: 1, 2, 4, then more than 4 run slots
        log, used = RunLog(engine), attach_graphs(engine, max_bs=4)
        assert [o.token_ids for o in engine.generate_batch(prompts(7, longest=12), params)] == expected
        slots = {bucket[2] for bucket in used}
        assert {1, 2, 4} & slots and not slots - {0, 1, 2, 4}  # never more slots than the graphs have
        assert any(s > 4 for s in log.slots)  # those steps ran eagerly
        assert any(bucket[0] == 1 and bucket[2] == 0 for bucket in used)  # one sequence keeps its gather graph
        engine.runner.allocator.free_pages(held)


def test_the_flag_is_validated_and_reaches_the_runner(checkpoints):
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(model_path=str(checkpoints["dense"]), device="cpu", attention_backend="flash")
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", attention_backend="gather") as engine:
        assert engine.runner.attention_backend.name == "gather"
    args = build_parser().parse_args(["hi", "--attention-backend", "gather"])
    assert args.attention_backend == "gather"
    assert build_parser().parse_args(["hi"]).attention_backend is None  # SGLang's flag; the device chooses


def test_the_default_backend_is_the_fast_one_for_the_device(checkpoints):
    """In place on CUDA; gathered on the CPU, where each run is a Python loop (the reference)."""
    assert default_backend(torch.device("cuda")) == "runs"
    assert default_backend(torch.device("cpu")) == "gather"
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        assert engine.runner.attention_backend.name == "gather"
