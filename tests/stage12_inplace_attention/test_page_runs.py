"""Stage 12: decode attention over page runs, read in place and merged by log-sum-exp.

The oracle is attention over the same keys gathered into one contiguous copy
(``causal_attention``, what stages 02-11 compute): runs + merge must give the
same output for any page layout.
"""

import pytest
import torch

from common.attention import causal_attention
from stage12_inplace_attention.page_runs import (
    ExtendRunAttention,
    RunAttention,
    extend_runs,
    pack_runs,
    runs_per_seq,
    token_runs,
    truncate_runs,
)

PAGE = 4


def test_a_page_table_reads_as_runs_of_consecutive_pages():
    runs = []
    extend_runs(runs, [7, 8, 9, 3, 4, 12])
    assert runs == [[7, 3], [3, 2], [12, 1]]
    extend_runs(runs, [13, 14, 2])
    assert runs == [[7, 3], [3, 2], [12, 3], [2, 1]]
    truncate_runs(runs, 6)  # the first six pages: 7 8 9 3 4 12
    assert runs == [[7, 3], [3, 2], [12, 1]]
    truncate_runs(runs, 2)
    assert runs == [[7, 2]]


def test_token_runs_cover_exactly_the_sequence():
    runs = [[7, 3], [3, 2]]  # pages 7 8 9 | 3 4: 20 slots of 4
    assert token_runs(runs, 19, PAGE) == [(28, 12), (12, 7)]
    assert token_runs(runs, 12, PAGE) == [(28, 12)]  # the last page is not reached
    assert token_runs(runs, 5, PAGE) == [(28, 5)]


def test_run_slots_are_powers_of_two():
    assert [runs_per_seq(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    assert pack_runs([[(28, 12), (12, 7)], [(0, 3)], [(4, 1), (8, 1), (40, 2)]]) == (
        4, [28, 12, 0, 0, 0, 0, 0, 0, 4, 8, 40, 0], [12, 7, 0, 0, 3, 0, 0, 0, 1, 1, 2, 0])


def layout(name: str, gen: torch.Generator, num_pages: int) -> list[list[int]]:
    """Page tables of 3 sequences, as named: how their pages lie in a pool of ``num_pages``."""
    perm = torch.randperm(num_pages, generator=gen).tolist()
    if name == "one-page runs":  # every page its own run
        return [perm[0:5], perm[5:8], perm[8:17]]
    if name == "long runs":
        return [list(range(9)), list(range(20, 23)), list(range(30, 35))]
    if name == "shared prefix":  # the prefix cache's pages lead every table, then each sequence's own run
        prefix = list(range(40, 44))
        return [prefix + list(range(5)), prefix + list(range(10, 12)), prefix + [50, 21, 22, 23]]
    raise ValueError(name)


@pytest.mark.parametrize("name", ["one-page runs", "long runs", "shared prefix"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])  # plain and grouped KV heads
def test_runs_and_merge_equal_attention_over_gathered_keys(name, heads, kv_heads):
    gen = torch.Generator().manual_seed(len(name) + heads)
    num_pages, dim = 64, 16
    k_pool = torch.randn(num_pages * PAGE, kv_heads, dim, generator=gen, dtype=torch.float64)
    v_pool = torch.randn(num_pages * PAGE, kv_heads, dim, generator=gen, dtype=torch.float64)
    tables = layout(name, gen, num_pages)
    seq_lens = [len(t) * PAGE - i for i, t in enumerate(tables)]  # last pages partly filled
    ranges = []
    for table, seq_len in zip(tables, seq_lens):
        runs = []
        extend_runs(runs, table)
        ranges.append(token_runs(runs, seq_len, PAGE))
    _, starts, lens = pack_runs(ranges)  # padded with empty runs (but for "long runs")
    q = torch.randn(len(tables), heads, dim, generator=gen, dtype=torch.float64)
    attention = RunAttention(torch.tensor(starts), torch.tensor(lens), len(tables), max(lens))
    got = attention(q, k_pool, v_pool)
    for i, (table, seq_len) in enumerate(zip(tables, seq_lens)):
        key_slots = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(seq_len)])
        expected = causal_attention(q[i : i + 1], k_pool[key_slots], v_pool[key_slots])
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-10, atol=1e-10)


def test_empty_run_slots_drop_out_of_the_merge():
    """A sequence's runs padded with empty slots, whose keys would change the answer if counted."""
    gen = torch.Generator().manual_seed(3)
    k_pool, v_pool = torch.randn(2, 32, 2, 8, generator=gen)
    q = torch.randn(1, 2, 8, generator=gen)
    alone = RunAttention(torch.tensor([4]), torch.tensor([6]), 1, 6)(q, k_pool, v_pool)
    # Empty slots pointing at real keys: a merge that ignored the lengths would mix them in.
    padded = RunAttention(torch.tensor([4, 0, 16, 20]), torch.tensor([6, 0, 0, 0]), 1, 6)(q, k_pool, v_pool)
    torch.testing.assert_close(padded, alone)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])  # plain and grouped KV heads
def test_an_extend_over_one_run_each_equals_causal_attention_over_gathered_keys(heads, kv_heads):
    """Sequences feeding 5, 1, 3 and 6 new tokens (the last a whole prompt) after cached prefixes,
    each sequence's keys one run of the pool (its new ones already written, as the engine does)."""
    gen = torch.Generator().manual_seed(heads)
    dim = 16
    k_pool = torch.randn(256, kv_heads, dim, generator=gen, dtype=torch.float64)
    v_pool = torch.randn(256, kv_heads, dim, generator=gen, dtype=torch.float64)
    starts, seq_lens, new_lens = [40, 4, 120, 200], [17, 9, 30, 6], [5, 1, 3, 6]
    q = torch.randn(sum(new_lens), heads, dim, generator=gen, dtype=torch.float64)
    attention = ExtendRunAttention(torch.tensor(new_lens), torch.tensor(starts), torch.tensor(seq_lens),
                                   max(new_lens), max(seq_lens))
    got = attention(q, k_pool, v_pool)
    first = 0
    for start, seq_len, new in zip(starts, seq_lens, new_lens):
        rows, keys = slice(first, first + new), slice(start, start + seq_len)
        torch.testing.assert_close(got[rows], causal_attention(q[rows], k_pool[keys], v_pool[keys]), rtol=1e-10, atol=1e-10)
        first += new
