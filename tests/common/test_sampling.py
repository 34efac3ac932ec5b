"""Each sampling parameter shapes the distribution the way its name promises, and the
batched sampler gives what the plain per-row math (the oracle below) gives."""


import math

import pytest
import torch

from common.sampling import RowFilters, Sampler, SamplingParams, exponential_, filter_probabilities

VOCAB = 50


def logits_batch(rows=1, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw(params, logits, n=1, sampler=None):
    """n steps of one request (its state kept across steps, as an engine keeps it)."""
    sampler = sampler or Sampler("cpu", seed=0)
    state = sampler.new_state(params, [])
    return [sampler(logits.clone(), [state]).item() for _ in range(n)]


# ----- the oracle: one row at a time, sorting the whole vocabulary ------------------------------


def reference_penalties(logits, params, prompt_ids, output_ids):
    """The per-row penalty math, from token lists."""
    out = logits.clone()
    for row, p in enumerate(params):
        seen = sorted(set(prompt_ids[row]) | set(output_ids[row]))
        if p.repetition_penalty != 1.0 and seen:
            scores = out[row, seen]
            out[row, seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        counts = torch.bincount(torch.tensor(output_ids[row], dtype=torch.long), minlength=logits.shape[1]).float()
        out[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return out


def reference_filter(probs, top_k, top_p, min_p):
    """Each row sorted; top-k by rank, top-p by the mass before a token, min-p against the best."""
    out = torch.zeros_like(probs)
    for row in range(probs.shape[0]):
        sorted_probs, order = probs[row].sort(descending=True)
        rank = torch.arange(probs.shape[1])
        drop = rank >= (top_k[row] if top_k[row] > 0 else probs.shape[1])
        drop |= (sorted_probs.cumsum(0) - sorted_probs) >= top_p[row]
        drop |= sorted_probs < min_p[row] * sorted_probs[0]
        out[row, order] = sorted_probs.masked_fill(drop, 0.0)
    return out / out.sum(-1, keepdim=True)


def batched_filter(probs, top_k, top_p, min_p):
    rows = [i for i, p in enumerate(top_p) if p < 1]
    filters = RowFilters(torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p), max(top_k),
                         any(m > 0 for m in min_p), torch.tensor(rows) if rows else None)
    return filter_probabilities(probs, filters)


# ----- behaviour --------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = logits_batch()
    assert draw(SamplingParams(temperature=0), logits, n=3) == [logits.argmax().item()] * 3


def test_greedy_rows_stay_exact_argmax_beside_sampled_rows():
    logits = logits_batch(4, seed=3)
    sampler = Sampler("cpu", seed=0)
    states = [sampler.new_state(SamplingParams(temperature=t), []) for t in (0, 1.0, 0, 2.0)]
    tokens = sampler(logits, states)
    assert tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = logits_batch()
    assert set(draw(SamplingParams(temperature=5.0, top_k=1), logits, n=20)) == {logits.argmax().item()}


def test_same_seed_reproduces_and_other_seed_differs():
    logits = logits_batch()
    a = draw(SamplingParams(temperature=1.5, seed=42), logits, n=30)
    b = draw(SamplingParams(temperature=1.5, seed=42), logits, n=30)
    c = draw(SamplingParams(temperature=1.5, seed=43), logits, n=30)
    assert a == b and a != c


@pytest.mark.parametrize("neighbours", [[], [dict(temperature=0)], [dict(temperature=1.0), dict(top_p=0.5)],
                                        [dict(frequency_penalty=1.0), dict(top_k=3, temperature=0.7), dict(min_p=0.2)]])
@pytest.mark.parametrize("position", ["first", "last"])
def test_seeded_request_gives_the_same_tokens_whatever_its_batch(neighbours, position):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    logits = logits_batch(1 + len(neighbours), seed=1)
    alone = draw(params, logits[:1], n=10)
    sampler = Sampler("cpu", seed=123)
    states = [sampler.new_state(SamplingParams(**n), [1, 2]) for n in neighbours]
    mine = sampler.new_state(params, [])
    states = [mine] + states if position == "first" else states + [mine]
    rows = logits if position == "first" else torch.cat([logits[1:], logits[:1]])
    row = 0 if position == "first" else len(states) - 1
    together = [sampler(rows.clone(), states)[row].item() for _ in range(10)]
    assert together == alone


def test_draws_follow_the_distribution():
    """20k rows in one call: token frequencies match softmax(logits / T) (a 5-sigma band)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    rows = 20000
    sampler = Sampler("cpu", seed=0)
    states = [sampler.new_state(SamplingParams(temperature=0.8), []) for _ in range(rows)]
    tokens = sampler(logits.expand(rows, -1).clone(), states)
    freq = torch.bincount(tokens, minlength=5).float() / rows
    expected = torch.softmax(logits[0] / 0.8, -1)
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / rows).sqrt() + 1e-9).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_the_race_noise_is_exponential(device):
    """The noise of the exponential race (``-log U`` on the CPU) is Exp(1): its mean is 1 and
    P(E > t) = exp(-t) (5-sigma bands over 200k draws), and every draw is positive and finite."""
    noise = exponential_(torch.empty(200_000, device=device), torch.Generator(device=device).manual_seed(0)).cpu()
    n = len(noise)
    assert (noise > 0).all() and noise.isfinite().all() and abs(noise.mean().item() - 1) <= 5 / n**0.5  # Exp(1): variance 1
    for t in (0.1, 1.0, 3.0):
        p = math.exp(-t)
        assert abs((noise > t).float().mean().item() - p) <= 5 * (p * (1 - p) / n) ** 0.5, t


def test_filters_equal_the_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, VOCAB, generator=gen) * 2, -1)
    top_k = torch.randint(0, 12, (64,), generator=gen).tolist()  # 0: off
    top_p = [1.0 if i % 3 == 0 else 0.3 + 0.6 * torch.rand(1, generator=gen).item() for i in range(64)]
    min_p = [0.0 if i % 2 else 0.3 * torch.rand(1, generator=gen).item() for i in range(64)]
    torch.testing.assert_close(batched_filter(probs, top_k, top_p, min_p), reference_filter(probs, top_k, top_p, min_p))


def test_top_p_keeps_the_smallest_set_reaching_p():
    kept = batched_filter(torch.tensor([[0.5, 0.3, 0.15, 0.05]]), [0], [0.7], [0.0])
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_p_always_keeps_the_most_likely_token():
    kept = batched_filter(torch.tensor([[0.9, 0.1]]), [0], [0.01], [0.0])
    torch.testing.assert_close(kept, torch.tensor([[1.0, 0.0]]))


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    kept = batched_filter(torch.tensor([[0.5, 0.3, 0.15, 0.05]]), [0], [1.0], [0.5])
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


@pytest.mark.parametrize("params", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3)])
def test_sampling_never_picks_a_filtered_token(params):
    logits = logits_batch()
    probs = torch.softmax(logits / 2.0, -1)
    allowed = set(reference_filter(probs, [params.get("top_k", 0)], [params.get("top_p", 1.0)],
                                   [params.get("min_p", 0.0)])[0].nonzero().flatten().tolist())
    assert set(draw(SamplingParams(temperature=2.0, **params), logits, n=200)) <= allowed


@pytest.mark.parametrize("field", ["repetition_penalty", "frequency_penalty", "presence_penalty"])
def test_penalties_equal_the_reference_as_tokens_accumulate(field):
    """Five steps of a batch (one penalized row per penalty, one plain row): each step's
    penalized logits equal the oracle's, computed from the token lists so far."""
    value = 1.5 if field == "repetition_penalty" else 0.8
    params = [SamplingParams(temperature=0, **{field: value}), SamplingParams(temperature=0)]
    prompts = [[3, 4, 4], [5]]
    sampler = Sampler("cpu", seed=0)
    states = [sampler.new_state(p, prompt) for p, prompt in zip(params, prompts)]
    outputs = [[], []]
    seen = []
    for step in range(5):
        logits = logits_batch(2, seed=step)
        tokens = sampler(logits.clone(), states).tolist()
        expected = reference_penalties(logits, params, prompts, outputs).argmax(-1).tolist()
        seen.append((tokens, expected))
        for row, token in enumerate(tokens):
            outputs[row].append(token)
    assert all(tokens == expected for tokens, expected in seen)
    rows = torch.tensor([states[0].penalty_row])
    torch.testing.assert_close(sampler.penalties.counts[rows][0], torch.bincount(torch.tensor(outputs[0]), minlength=VOCAB).float())


def test_presence_penalty_makes_greedy_avoid_repeats():
    sampler = Sampler("cpu", seed=0)
    state = sampler.new_state(SamplingParams(temperature=0, presence_penalty=2.0), [])
    tokens = [sampler(torch.zeros(1, 5), [state]).item() for _ in range(5)]
    assert sorted(tokens) == [0, 1, 2, 3, 4]


def test_repetition_penalty_reaches_prompt_tokens_too():
    sampler = Sampler("cpu", seed=0)
    state = sampler.new_state(SamplingParams(temperature=0, repetition_penalty=2.0), [4])
    logits = torch.full((1, VOCAB), 2.0)
    logits[0, 4] = 3.0  # best, but seen in the prompt: 3 / 2 < 2
    assert sampler(logits, [state]).item() != 4


def test_penalty_rows_are_reused_once_requests_are_gone():
    sampler = Sampler("cpu", seed=0)
    for _ in range(12):  # more requests than the first allocation's 8 rows, one after another
        state = sampler.new_state(SamplingParams(temperature=0, frequency_penalty=1.0), [1])
        sampler(logits_batch(), [state])
        del state  # its row goes back as the state is freed
    assert sampler.penalties.counts.shape[0] == 8  # the first allocation, never grown


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


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    # 1e-300 is 0 in fp32: dividing the logits by it gave inf, softmax NaN, and token 0 every time.
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize("seed", [True, 2**64, -(2**63) - 1, 1.5, "7"])
def test_a_seed_must_be_a_64_bit_integer(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)


@pytest.mark.parametrize("stop", [5, True, {"a": 1}, [""], ["ok", 3]])
def test_stop_must_be_strings(stop):
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("ids", [1, False, [True], [-1], [1.0]])
def test_stop_token_ids_must_be_a_list_of_ids(ids):
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=ids)
