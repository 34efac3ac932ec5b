"""Stage 05: chunked prefill gives stage04's tokens, keeps decode moving, and bounds each forward."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common.sampling import SamplingParams
from stage05_chunked import Engine

PAGE = 4


def tokens(n, seed):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


PROMPTS = [tokens(n, 500 + n) for n in (3, 9, 40, 150, 17, 120)]
SHARED = tokens(60, 9)


@pytest.fixture(scope="module")
def stage04_tokens(checkpoints):
    from stage04_batching import Engine as Stage04

    with Stage04(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE) as engine:
        yield lambda prompts, n: [o.token_ids for o in engine.generate_batch(prompts, greedy(n))]


def chunked_engine(checkpoints, chunk, **kwargs):
    return Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE, chunked_prefill_size=chunk, **kwargs)


def record_steps(engine):
    """Log (request ids, new lengths, prompt tokens fed) of every forward step."""
    steps, original = [], engine.runner.step

    def logged(requests, new_lengths):
        prompt_tokens = sum(n for r, n in zip(requests, new_lengths) if r.num_cached + n <= len(r.prompt_ids))
        steps.append(([r.id for r in requests], list(new_lengths), prompt_tokens))
        return original(requests, new_lengths)

    engine.runner.step = logged
    return steps


def assert_no_leak(engine):
    assert not engine.scheduler.running and not engine.scheduler.waiting
    engine.flush_cache()
    assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


@pytest.mark.parametrize("chunk", [1, 7, PAGE, 1000])
def test_same_tokens_as_stage04_for_any_chunk_size(chunk, checkpoints, stage04_tokens):
    with chunked_engine(checkpoints, chunk) as engine:
        steps = record_steps(engine)
        outputs = engine.generate_batch(PROMPTS, greedy(8))
        assert [o.token_ids for o in outputs] == stage04_tokens(PROMPTS, 8)
        assert all(prompt_tokens <= chunk for _, _, prompt_tokens in steps)
        assert_no_leak(engine)


def test_a_long_prompt_is_cut_into_chunks_and_decoders_keep_going(checkpoints, stage04_tokens):
    """While a 150-token prompt is prefilled 16 tokens at a time, the running requests decode every step."""
    with chunked_engine(checkpoints, 16) as engine:
        early = [engine.add_request(p, greedy(30)) for p in PROMPTS[:2]]
        engine.step()  # prefill both short prompts
        long_id = engine.add_request(PROMPTS[3], greedy(4))
        steps = record_steps(engine)
        outputs = {}
        while len(outputs) < 3:
            engine.step()
            for rid in early + [long_id]:
                if rid not in outputs and (out := engine.get_output(rid)) is not None:
                    outputs[rid] = out
        chunk_steps = [lengths for ids, lengths, _ in steps if long_id in ids and lengths[ids.index(long_id)] > 1]
        assert len(chunk_steps) == -(-150 // 16)  # ceil: the prompt went in 10 chunks
        for ids, _, _ in steps[: len(chunk_steps)]:
            assert set(early) <= set(ids), "a decoding request was stalled by the long prefill"
        assert [outputs[r].token_ids for r in early] == stage04_tokens(PROMPTS[:2], 30)
        assert outputs[long_id].token_ids == stage04_tokens([PROMPTS[3]], 4)[0]
        assert_no_leak(engine)


def test_several_long_prompts_at_once(checkpoints, stage04_tokens):
    prompts = [tokens(130, 11), tokens(110, 12), tokens(140, 13)]
    with chunked_engine(checkpoints, 32) as engine:
        outputs = engine.generate_batch(prompts, greedy(6))
        assert [o.token_ids for o in outputs] == stage04_tokens(prompts, 6)
        assert_no_leak(engine)


def test_chunking_with_prefix_hits(checkpoints, stage04_tokens):
    prompts = [SHARED + tokens(50, 14), SHARED + tokens(70, 15), SHARED[:30] + tokens(5, 16)]
    with chunked_engine(checkpoints, 8) as engine:
        engine.generate(SHARED + [1, 2, 3], greedy(3))  # cache the shared prefix
        outputs = engine.generate_batch(prompts, greedy(6))
        assert [o.token_ids for o in outputs] == stage04_tokens(prompts, 6)
        assert all(o.cached_tokens >= 28 for o in outputs)
        assert_no_leak(engine)


def test_chunking_with_retraction(checkpoints, stage04_tokens):
    prompts = [tokens(n, 600 + n) for n in (12, 10, 14, 11)]
    with chunked_engine(checkpoints, 8) as probe:
        page_bytes = probe.runner.pool.bytes_per_page(probe.config, PAGE, torch.float32)
    with chunked_engine(checkpoints, 8, kv_cache_bytes=30 * page_bytes) as engine:
        outputs = engine.generate_batch(prompts, greedy(60))
        assert engine.scheduler.num_retractions > 0
        assert [o.token_ids for o in outputs] == stage04_tokens(prompts, 60)
        assert_no_leak(engine)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest new tensor any op produces (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's memory (e.g. the KV pool): not new activations.
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def peak_forward_tensor(engine, prompt):
    """Largest tensor made inside the model's forward (the KV pool and logits are outside it)."""
    forward, peak = engine.runner.model.forward, [0]

    def measured(*args, **kwargs):
        with LargestTensor() as mode:
            out = forward(*args, **kwargs)
        peak[0] = max(peak[0], mode.largest)
        return out

    engine.runner.model.forward = measured
    engine.generate(prompt, greedy(2))
    return peak[0]


def test_peak_activation_of_a_prefill_step_is_bounded_by_the_chunk(checkpoints):
    prompt = tokens(400, 17)
    with chunked_engine(checkpoints, 16) as chunked, chunked_engine(checkpoints, -1) as whole:
        config = chunked.config
        chunked_peak, whole_peak = peak_forward_tensor(chunked, prompt), peak_forward_tensor(whole, prompt)
    # Per chunk: the MLP activations [16, intermediate] or the scores [heads, 16, 400].
    bound = 16 * max(config.intermediate_size, config.num_attention_heads * len(prompt), 2 * config.hidden_size)
    assert chunked_peak <= bound < whole_peak


def test_bad_chunk_size_is_refused(checkpoints):
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        chunked_engine(checkpoints, 0)


def test_the_default_chunk_is_sized_from_the_device(monkeypatch):
    """2,048 prompt tokens a step on the CPU; on a GPU, more with more memory (SGLang sizes it so)."""
    from stage05_chunked.engine_args import EngineArgs, default_chunked_prefill_size

    assert EngineArgs(device="cpu").chunked_prefill_size == 2048
    assert EngineArgs(device="cpu", chunked_prefill_size=-1).chunked_prefill_size == -1  # off, and stays off
    sizes = {}
    for gib in (16, 40, 64, 80, 141):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, gib=gib: SimpleNamespace(total_memory=gib << 30))
        sizes[gib] = default_chunked_prefill_size(torch.device("cuda"))
    assert sizes == {16: 2048, 40: 4096, 64: 8192, 80: 16384, 141: 16384}
