"""Each sampling parameter shapes the distribution the way its name promises."""

import pytest
import torch

from common.sampling import SamplingParams, Sampler, apply_penalties, filter_probabilities

VOCAB = 50


def logits_batch(rows=1, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw(params, logits, prompt=(), output=(), n=1, sampler=None):
    sampler = sampler or Sampler("cpu", seed=0)
    gen = sampler.new_generator(params.seed)
    return [sampler(logits.clone(), [params], [list(prompt)], [list(output)], [gen])[0] for _ in range(n)]


def test_temperature_zero_is_argmax():
    logits = logits_batch()
    assert draw(SamplingParams(temperature=0), logits, n=3) == [logits.argmax().item()] * 3


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = logits_batch()
    assert set(draw(SamplingParams(temperature=5.0, top_k=1), logits, n=20)) == {logits.argmax().item()}


def test_same_seed_reproduces_and_other_seed_differs():
    logits = logits_batch()
    a = draw(SamplingParams(temperature=1.5, seed=42), logits, n=30)
    b = draw(SamplingParams(temperature=1.5, seed=42), logits, n=30)
    c = draw(SamplingParams(temperature=1.5, seed=43), logits, n=30)
    assert a == b and a != c


def test_seeded_row_is_independent_of_its_batch_neighbours():
    sampler = Sampler("cpu", seed=0)
    params = SamplingParams(temperature=1.0, seed=5)
    alone = sampler(logits_batch(1), [params], [[]], [[]], [sampler.new_generator(5)])
    logits = torch.cat([logits_batch(1), logits_batch(1, seed=9)])
    other = SamplingParams(temperature=1.0)
    together = sampler(logits, [params, other], [[], []], [[], []], [sampler.new_generator(5), sampler.new_generator(None)])
    assert together[0] == alone[0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_probabilities(probs, torch.tensor([4]), torch.tensor([0.7]), torch.tensor([0.0]))
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_p_always_keeps_the_most_likely_token():
    probs = torch.tensor([[0.9, 0.1]])
    kept = filter_probabilities(probs, torch.tensor([2]), torch.tensor([0.01]), torch.tensor([0.0]))
    torch.testing.assert_close(kept, torch.tensor([[1.0, 0.0]]))


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_probabilities(probs, torch.tensor([4]), torch.tensor([1.0]), torch.tensor([0.5]))
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_sampling_never_picks_a_filtered_token():
    logits = logits_batch()
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(draw(SamplingParams(temperature=2.0, top_k=3), logits, n=50)) <= allowed


@pytest.mark.parametrize("field", ["repetition_penalty", "frequency_penalty", "presence_penalty"])
def test_penalties_lower_a_repeated_tokens_probability(field):
    logits = logits_batch()
    token = logits.argmax().item()
    value = 1.5 if field == "repetition_penalty" else 1.0
    params = SamplingParams(**{field: value})
    penalized = apply_penalties(logits.clone(), [params], [[token]], [[token, token]])
    before, after = torch.softmax(logits, -1)[0, token], torch.softmax(penalized, -1)[0, token]
    assert after < before
    untouched = [t for t in range(VOCAB) if t != token]
    assert torch.equal(penalized[0, untouched], logits[0, untouched])


def test_frequency_penalty_grows_with_the_count():
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(frequency_penalty=0.5)
    penalized = apply_penalties(logits.clone(), [params], [[]], [[3, 3, 3, 7]])
    assert penalized[0, 3].item() == pytest.approx(-1.5) and penalized[0, 7].item() == pytest.approx(-0.5)


def test_repetition_penalty_reaches_prompt_tokens_too():
    logits = torch.full((1, VOCAB), 2.0)
    penalized = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[4]], [[]])
    assert penalized[0, 4].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_nonsense_values_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_unknown_keyword_is_refused():
    with pytest.raises(ValueError, match="unknown sampling parameter.*temprature"):
        SamplingParams.from_kwargs(temprature=0.5)


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n").stop == ["\n"]
