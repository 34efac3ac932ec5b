"""No stage reads a KV slot that no request wrote.

The pool is allocated with ``torch.empty``: a slot holds whatever that memory
held before, NaN included, until a request writes it. Masking such a slot out
of attention is not enough: its softmax weight is 0, but 0 * NaN is NaN. So a
stage must never hand attention an unwritten slot: not the tail of a
request's last page, not the keys that pad a short row of a decode batch to the
longest. Filling the whole pool with NaN before serving must change no token.
(Stage 09's padding rows, which run only in CUDA graphs, have their own test.)
"""


import pytest

from conftest import STAGES, stage_engine_class, stage_has

PAGE = 4  # most pages end part-filled
GREEDY = dict(max_tokens=9, temperature=0, ignore_eos=True)
SHARED = [11, 12, 13, 14, 15, 16]  # a prefix two prompts share: the second reads the first's pages
PROMPTS = [[5], [7, 8, 9], SHARED + [21, 22, 23], SHARED + [31], [(i * 13) % 900 + 3 for i in range(45)]]


@pytest.mark.parametrize("stage", STAGES)
def test_a_pool_full_of_nan_changes_no_token(stage, checkpoints):
    engine_class = stage_engine_class(stage)
    kwargs = {"page_size": PAGE} if stage_has(stage, "page_size") else {}
    with engine_class(model_path=str(checkpoints["dense"]), device="cpu", **kwargs) as engine:
        pool = getattr(engine.runner, "pool", None)
        if pool is None:
            pytest.skip("stage 01 keeps each request's cache in its own tensors")
        for cache in (pool.k, pool.v):
            cache.zero_()
        expected = engine.generate(PROMPTS, **GREEDY)
        getattr(engine, "flush_cache", lambda: None)()  # the same prompts are computed again
        for cache in (pool.k, pool.v):
            cache.fill_(float("nan"))
        served = engine.generate(PROMPTS, **GREEDY)
        assert [r.token_ids for r in served] == [r.token_ids for r in expected]
        assert all(r.finish_reason == "length" for r in served)
