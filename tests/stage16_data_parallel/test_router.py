"""Stage 16's router on its own: each method's choices, the prompt tree, replicas taken out."""

import random

import pytest

from stage16_data_parallel.router import BALANCE_ABS_THRESHOLD, PromptTree, Router


def test_round_robin_takes_turns_and_skips_a_dead_replica():
    router = Router(3, "round_robin")
    assert [router.choose([1]) for _ in range(4)] == [0, 1, 2, 0]
    router.replica_down(1)
    assert [router.choose([1]) for _ in range(4)] == [0, 2, 0, 2]


def test_shortest_queue_picks_the_least_loaded():
    router = Router(2, "shortest_queue")
    assert [router.choose([i]) for i in range(3)] == [0, 1, 0]
    router.finished(0)
    router.finished(0)
    assert router.choose([9]) == 0 and router.load == [1, 1]


def test_cache_aware_follows_the_prefix_and_balances_when_loads_part():
    router = Router(2, "cache_aware")
    a, b = list(range(100, 164)), list(range(200, 264))
    first_a, first_b = router.choose(a + [1]), router.choose(b + [2])
    assert first_a != first_b  # no match anywhere: the replica sent the fewest tokens
    assert all(router.choose(a + [i]) == first_a for i in range(3, 6))
    assert all(router.choose(b + [i]) == first_b for i in range(6, 9))
    for _ in range(BALANCE_ABS_THRESHOLD + 1):  # pile load onto a's replica
        router.choose(a + [0])
    assert router.choose(a + [7]) == first_b  # too uneven: the shortest queue wins over the cache


def test_no_replica_left_is_an_error():
    router = Router(1, "cache_aware")
    router.replica_down(0)
    with pytest.raises(RuntimeError, match="no replica is alive"):
        router.choose([1])


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="load_balance_method"):
        Router(2, "random")


def test_the_prompt_tree_matches_prefixes_and_forgets_the_least_recently_used():
    tree = PromptTree(max_tokens=12)
    tree.insert([1, 2, 3, 4])
    tree.insert([1, 2, 9])
    assert tree.match([1, 2, 3, 7]) == 3 and tree.match([1, 2, 9, 9]) == 3 and tree.match([5]) == 0
    assert tree.size == 5
    rng = random.Random(0)
    other = [rng.randrange(50, 99) for _ in range(8)]
    tree.insert(other)  # 13 tokens: forgotten down to 10, least recently used leaves first (4, 3, then 9)
    assert tree.size == 10 and tree.match([1, 2, 3, 4]) == 2 and tree.match([1, 2, 9]) == 2 and tree.match(other) == 8
