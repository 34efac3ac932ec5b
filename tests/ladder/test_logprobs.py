"""Log-probabilities (SGLang's return_logprob / top_logprobs_num / logprob_start_len) in every stage.

They are the model's own (log_softmax of the raw logits, before penalties and
temperature), so transformers' forward over the prompt and the generated text
is the oracle, whatever settings sampled the text. The prefix cache and
chunked prefill must not hide a prompt position whose score was asked for.
"""

import pytest
import torch

from conftest import STAGES, stage_has
from reference import load_hf

PROMPT = [5, 17, 301, 9, 44, 1020, 7, 7, 3050, 12, 88, 5, 17, 301, 9, 64, 2, 900, 31]  # 19 tokens
LOGPROBS = dict(return_logprob=True, top_logprobs_num=3)


@pytest.fixture(scope="module")
def hf_logprobs(checkpoints):
    """tokens -> transformers' fp32 log-probabilities of every next token ``[len, vocab]``."""
    model = load_hf(checkpoints["dense"])

    @torch.no_grad()
    def score(tokens: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)

    return score


def assert_scores(scores, tops, tokens, start, reference):
    """``scores[j]`` is token ``tokens[start + j]``'s log-probability; ``tops[j]`` its step's top 3."""
    for j, (score, top) in enumerate(zip(scores, tops)):
        position = start + j
        expected = reference[position - 1]
        assert score == pytest.approx(expected[tokens[position]].item(), abs=1e-4)
        values, ids = expected.topk(3)
        assert [i for i, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_prompt_and_output_logprobs_equal_transformers(stage, engine_for, hf_logprobs):
    out = engine_for(stage, "dense").generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                                              logprob_start_len=0, **LOGPROBS)
    tokens = PROMPT + out.token_ids
    reference = hf_logprobs(tokens)
    assert out.input_token_logprobs[0] is None and out.input_top_logprobs[0] is None  # nothing predicts token 0
    assert len(out.input_token_logprobs) == len(PROMPT) and len(out.output_token_logprobs) == 6
    assert_scores(out.input_token_logprobs[1:], out.input_top_logprobs[1:], tokens, 1, reference)
    assert_scores(out.output_token_logprobs, out.output_top_logprobs, tokens, len(PROMPT), reference)
    # Greedy picks the most likely token: it heads its own top list.
    assert all(top[0][0] == t for top, t in zip(out.output_top_logprobs, out.token_ids))


@pytest.mark.parametrize("stage", STAGES)
def test_logprobs_are_the_models_before_penalties_and_temperature(stage, engine_for, hf_logprobs):
    out = engine_for(stage, "dense").generate(PROMPT, max_tokens=8, temperature=1.3, seed=4, ignore_eos=True,
                                              repetition_penalty=1.5, presence_penalty=1.0, **LOGPROBS)
    tokens = PROMPT + out.token_ids
    assert_scores(out.output_token_logprobs, out.output_top_logprobs, tokens, len(PROMPT), hf_logprobs(tokens))
    assert out.input_token_logprobs is None  # none asked for


@pytest.mark.parametrize("stage", STAGES)
def test_the_prefix_cache_does_not_hide_prompt_positions_asked_for(stage, engine_for, hf_logprobs):
    """The whole prompt is cached by the first request; the second asks from position 5 on."""
    engine = engine_for(stage, "dense", **({} if stage == "stage01_core" else {"page_size": 4}))
    engine.generate(PROMPT, max_tokens=2, temperature=0)
    out = engine.generate(PROMPT, max_tokens=2, temperature=0, logprob_start_len=5, **LOGPROBS)
    assert len(out.input_token_logprobs) == len(PROMPT) - 5
    assert out.cached_tokens <= 4  # the cache gave at most the page before position 4, whose row scores token 5
    assert_scores(out.input_token_logprobs, out.input_top_logprobs, PROMPT, 5, hf_logprobs(PROMPT + out.token_ids))
    again = engine.generate(PROMPT, max_tokens=2, temperature=0, return_logprob=True)
    assert len(again.output_token_logprobs) == 2
    if stage_has(stage, "disable_radix_cache"):  # a stage with a prefix cache: it serves a request that asks no prompt scores
        assert again.cached_tokens > 4


def test_chunked_prefill_scores_every_chunk(engine_for, hf_logprobs):
    stage = next(s for s in STAGES if stage_has(s, "chunked_prefill_size"))
    engine = engine_for(stage, "dense", chunked_prefill_size=4, page_size=4)
    out = engine.generate(PROMPT, max_tokens=3, temperature=0, logprob_start_len=2, **LOGPROBS)
    assert_scores(out.input_token_logprobs, out.input_top_logprobs, PROMPT, 2, hf_logprobs(PROMPT + out.token_ids))
