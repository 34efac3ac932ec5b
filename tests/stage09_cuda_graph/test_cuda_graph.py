"""Stage 09: everything around a CUDA graph, on the CPU.

A CPU has no graphs to record, but all the rest runs here: choosing a bucket,
padding a batch up to it, filling the fixed input buffers, and the forward
those buffers feed. ``CudaGraphRunner(capture=False)`` runs that forward
directly instead of replaying it, so these tests check that a padded, buffered
decode step gives exactly the tokens of stage 08. The recording itself is
checked on the GPU (``python -m benchmarks.gpu_graph_check``).
"""

import pytest
import torch

from benchmarks.gpu_graph_check import decode_batch
from common.sampling import SamplingParams
from stage09_cuda_graph import Engine
from stage09_cuda_graph.attention_backend import GatherAttention
from stage09_cuda_graph.cuda_graph_runner import MIN_KEY_BUCKET, CudaGraphRunner, batch_buckets, key_bucket
from stage09_cuda_graph.forward_batch import ForwardBatch

GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


class PackedPlan(GatherAttention):
    """Stage 08's plan in the packed (CUDA) layout, on the CPU."""

    packed = True


def prompts(count: int, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (int(n),), generator=gen).tolist() for n in torch.randint(3, 60, (count,), generator=gen)]


def attach_graphs(engine, max_bs: int) -> list[tuple[int, int]]:
    """Give the engine uncaptured decode graphs; returns (bucket batch size, real batch size) per graph step."""
    runner = engine.runner
    runner.graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages,
                                    max_bs, runner.config.max_position_embeddings, capture=False)
    used, run = [], runner.graphs.run

    def counting_run(batch, bucket):
        used.append((bucket[0], batch.sizes.num_seqs))
        return run(batch, bucket)

    runner.graphs.run = counting_run
    return used


def test_batch_buckets_follow_sglang():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]  # the largest size always gets a graph
    assert batch_buckets(3) == [1, 2, 3]


def test_key_buckets_are_powers_of_two_that_hold_every_key():
    assert key_bucket(1) == MIN_KEY_BUCKET
    assert key_bucket(MIN_KEY_BUCKET) == MIN_KEY_BUCKET
    assert key_bucket(MIN_KEY_BUCKET + 1) == 2 * MIN_KEY_BUCKET
    for n in (5000, 70_000, 123_457):
        assert n <= key_bucket(n) < 2 * n


def batch_of(new_lengths: list[int], seq_lens: list[int]) -> ForwardBatch:
    tokens = sum(new_lengths)
    return ForwardBatch.build(torch.device("cpu"), [0] * tokens, list(range(tokens)), list(range(len(seq_lens))),
                              new_lengths, seq_lens, list(range(tokens)) if tokens == len(seq_lens) else [0], ([], [], []))


def test_only_decode_batches_that_fit_get_a_graph(checkpoints):
    # An engine of its own: a graph runner takes a page-table row (its padding row) from the runner.
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        runner = engine.runner
        graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 16, 512,
                                 capture=False)
    assert graphs.bucket(batch_of([1] * 5, [30] * 5)) == (8, MIN_KEY_BUCKET)
    assert graphs.bucket(batch_of([1] * 16, [400] * 16)) == (16, 8192)  # 6400 keys
    assert graphs.bucket(batch_of([1] * 3, [400] * 3)) == (4, 2048)  # 1201 keys (and one padding row)
    assert graphs.bucket(batch_of([1] * 17, [3] * 17)) is None  # above the largest bucket
    assert graphs.bucket(batch_of([1, 7], [20, 7])) is None  # a prompt rides along: eager


@pytest.mark.parametrize("kind", ["dense", "moe", "llama"])
def test_padded_buffered_decode_gives_stage08_tokens(kind, checkpoints, engine_for):
    """11 requests with graphs up to 8: steps of 11 run eagerly, then 8, 5 ... in padded graphs."""
    reference = [o.token_ids for o in engine_for("stage08_ep", kind).generate_batch(prompts(11), **GREEDY)]
    with Engine(model_path=str(checkpoints[kind]), device="cpu") as engine:
        used = attach_graphs(engine, max_bs=8)
        params = [dict(GREEDY, max_tokens=m) for m in (3, 5, 8, 12, 10, 2, 11, 7, 9, 6, 4)]
        outputs = engine.generate_batch(prompts(11), [SamplingParams(**p) for p in params])
        reference = [r[: p["max_tokens"]] for r, p in zip(reference, params)]
        assert [o.token_ids for o in outputs] == reference
        assert {bs for bs, _ in used} >= {8, 4, 2, 1}  # shrinking batches rode every small bucket
        assert any(bs > n for bs, n in used)  # and some of those steps were padded
        engine.flush_cache()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages  # nothing leaked


def test_padding_rows_never_touch_a_real_row(engine_for, checkpoints):
    """Teacher-forced: one decode batch through the buffered forward with junk in the padding rows
    gives the logits of the eager forward for the real rows, and leaves the real KV untouched."""
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        runner = engine.runner
        for request_prompt in prompts(3, seed=9):
            engine.add_request(request_prompt, max_tokens=4, temperature=0, ignore_eos=True)
        engine.step()  # prefill: every request now decodes
        running = engine.scheduler.running
        assert len(running) == 3
        batch = decode_batch(runner, running)  # the same step ModelRunner.step would build
        kv_before = runner.pool.k.clone()
        eager_logits = runner.forward(batch)
        kv_eager = runner.pool.k.clone()
        runner.pool.k.copy_(kv_before)
        graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 8, 512, capture=False)
        graphs.inputs.fill_(3)  # junk left in the buffers: run() must overwrite every column it uses
        graph_logits = graphs.run(batch, graphs.bucket(batch))
        torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-5, atol=1e-5)
        padding = slice(graphs.padding_slot, graphs.padding_slot + runner.page_size)
        real = torch.ones(runner.pool.k.shape[1], dtype=torch.bool)
        real[padding] = False
        # The pool is torch.empty: slots no request wrote hold whatever the memory held, NaN included.
        torch.testing.assert_close(runner.pool.k[:, real], kv_eager[:, real], rtol=1e-5, atol=1e-5, equal_nan=True)
        assert graphs.padding_slot // runner.page_size == runner.allocator.num_pages  # a page no request can own


def test_the_graph_records_the_lm_head(checkpoints):
    """A graph step's logits come out of the graph: the forward it records ends with the lm_head at
    the bucket's row count (padding rows too: one GEMM shape per bucket, met at record time),
    written into the runner's one fixed buffer; the runner computes no logits of its own."""
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        used = attach_graphs(engine, max_bs=8)
        runner, calls, in_graph = engine.runner, [], []
        graphs, compute, run = runner.graphs, runner.model.compute_logits, runner.graphs.run

        def recording_compute(hidden, out=None):
            calls.append((bool(in_graph), len(hidden), out is not None and out.data_ptr() == graphs.logits.data_ptr()))
            return compute(hidden, out=out)

        def marked_run(batch, bucket):
            in_graph.append(True)
            try:
                logits = run(batch, bucket)
            finally:
                in_graph.pop()
            assert logits.data_ptr() == graphs.logits.data_ptr() and logits.shape == (batch.sizes.num_seqs, runner.config.vocab_size)
            return logits

        forward = runner.forward

        def watched_forward(batch):
            before, graphed = len(calls), len(used)
            logits = forward(batch)
            if len(used) > graphed:  # a graph step: its one lm_head call was the graph's
                assert [inside for inside, _, _ in calls[before:]] == [True]
            return logits

        runner.model.compute_logits, graphs.run, runner.forward = recording_compute, marked_run, watched_forward
        engine.generate_batch(prompts(5), **GREEDY)
        assert used  # graph steps ran
        assert [(rows, into) for inside, rows, into in calls if inside] == [(bs, True) for bs, _ in used]
        assert any(bs > n for bs, n in used)  # a padded step, its padding rows scored in the graph too


def test_the_plan_computed_in_the_graph_is_stage08s(engine_for, checkpoints):
    """The slots, key ranges and packed key slots the graph derives from its buffers equal the
    plan stage 08 builds eagerly; padding rows write and read only the padding slot."""
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=4) as engine:
        runner = engine.runner
        for request_prompt in prompts(5, seed=11):
            engine.add_request(request_prompt, max_tokens=4, temperature=0, ignore_eos=True)
        engine.step()
        running = engine.scheduler.running
        batch = decode_batch(runner, running)
        runner.page_tables.apply(batch.update_rows, batch.update_columns, batch.update_pages)
        eager = PackedPlan(runner.pool, runner.page_tables, batch)
        graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 8, 512, capture=False)
        bucket = graphs.bucket(batch)
        assert bucket[0] == 8  # 5 real rows and 3 padding rows
        graphs.run(batch, bucket)
        plan = graphs.graphs[bucket].attention
        n, total = len(running), batch.sizes.total_keys
        assert plan.slots[:n].tolist() == eager.slots.tolist()
        assert plan.slots[n:].tolist() == [graphs.padding_slot] * 3
        assert plan.cu_seqlens_k[: n + 1].tolist() == eager.cu_seqlens_k.tolist()
        assert plan.key_slots[:total].tolist() == eager.key_slots.tolist()
        assert set(plan.key_slots[total:].tolist()) == {graphs.padding_slot}  # padding rows' keys and the unused tail
        assert graphs.padding_row not in runner.page_tables.free_rows  # no request can take the padding row


def test_flags_are_validated_and_reach_the_runner(checkpoints):
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        Engine(model_path=str(checkpoints["dense"]), device="cpu", cuda_graph_max_bs=0)
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", cuda_graph_max_bs=32) as engine:
        assert engine.runner.cuda_graph_max_bs == 32
        assert engine.runner.graphs is None  # the CPU runs every step eagerly, as stage 08


def test_cli_has_the_sglang_flags():
    from stage09_cuda_graph.__main__ import build_parser

    args = build_parser().parse_args(["hi", "--disable-cuda-graph", "--cuda-graph-max-bs", "64"])
    assert args.disable_cuda_graph and args.cuda_graph_max_bs == 64
