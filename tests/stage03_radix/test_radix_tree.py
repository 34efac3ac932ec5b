"""The radix tree on its own: matching, splitting, locking and LRU eviction."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stage03_radix.page_allocator import PageAllocator
from stage03_radix.radix_cache import RadixCache


def new_cache(page_size=2, num_pages=64):
    allocator = PageAllocator(num_pages)
    return RadixCache(allocator, page_size), allocator


def cache_sequence(cache, allocator, tokens):
    """Insert a page-aligned token list with freshly allocated pages; free what the tree already had."""
    pages = allocator.alloc_pages(len(tokens) // cache.page_size)
    already = cache.insert(tokens, pages) // cache.page_size
    allocator.free_pages(pages[:already])
    return pages


def check_invariants(cache, allocator):
    nodes = list(cache._nodes())
    owned = [p for n in nodes for p in n.pages]
    assert len(owned) == len(set(owned)) == cache.total_pages
    assert set(owned) <= allocator.in_use
    assert cache.locked_pages == sum(len(n.pages) for n in nodes if n.lock_ref > 0)
    for node in nodes:
        assert len(node.key) == len(node.pages) * cache.page_size and node.key
        assert node.lock_ref >= 0 and node.parent.children[tuple(node.key[: cache.page_size])] is node
        assert all(child.lock_ref <= node.lock_ref for child in node.children.values())


def test_match_returns_the_longest_page_aligned_prefix():
    cache, allocator = new_cache(page_size=2)
    pages = cache_sequence(cache, allocator, [1, 2, 3, 4, 5, 6])
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7])[0] == pages
    assert cache.match_prefix([1, 2, 3, 9])[0] == pages[:1]  # the 2nd page differs
    assert cache.match_prefix([1, 2, 3])[0] == pages[:1]  # only whole pages count
    assert cache.match_prefix([7, 8])[0] == []


def test_a_partial_match_splits_the_edge():
    cache, allocator = new_cache(page_size=2)
    first = cache_sequence(cache, allocator, [1, 2, 3, 4, 5, 6])
    second = cache_sequence(cache, allocator, [1, 2, 3, 4, 9, 9])
    assert cache.match_prefix([1, 2, 3, 4, 9, 9])[0] == first[:2] + second[2:]
    (upper,) = cache.root.children.values()
    assert upper.key == [1, 2, 3, 4] and len(upper.children) == 2
    check_invariants(cache, allocator)


def test_evicts_least_recently_used_unlocked_leaf():
    cache, allocator = new_cache(page_size=1)
    a = cache_sequence(cache, allocator, [1, 1])
    b = cache_sequence(cache, allocator, [2, 2])
    cache.match_prefix([1, 1])  # touch a: b is now the least recently used
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 2])[0] == [] and cache.match_prefix([1, 1])[0] == a
    assert set(b) <= set(allocator.free_list)


def test_eviction_never_frees_a_locked_node():
    cache, allocator = new_cache(page_size=1)
    cache_sequence(cache, allocator, [1, 2, 3])
    _, node = cache.match_prefix([1, 2, 3])
    cache.lock(node)
    assert cache.evict(10) == 0 and cache.total_pages == 3
    cache.unlock(node)
    assert cache.evict(10) == 3 and allocator.num_free == allocator.num_pages


def test_flush_refuses_while_a_prefix_is_in_use():
    cache, allocator = new_cache()
    cache_sequence(cache, allocator, [1, 2])
    _, node = cache.match_prefix([1, 2])
    cache.lock(node)
    with pytest.raises(RuntimeError, match="requests are using it"):
        cache.flush()
    cache.unlock(node)
    cache.flush()
    assert allocator.num_free == allocator.num_pages and cache.total_pages == 0


sequences = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=12), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(seqs=sequences, page_size=st.sampled_from([1, 2, 3]), lock_mask=st.lists(st.booleans(), max_size=12))
def test_insert_match_lock_evict_keep_the_tree_consistent(seqs, page_size, lock_mask):
    cache, allocator = new_cache(page_size=page_size, num_pages=200)
    for seq in seqs:
        seq = seq[: len(seq) // page_size * page_size]
        cache_sequence(cache, allocator, seq)
        pages, _ = cache.match_prefix(seq)
        assert len(pages) * page_size == len(seq), "what was inserted must match in full"
        check_invariants(cache, allocator)
    locked = []
    for seq, lock in zip(seqs, lock_mask):
        if lock:
            pages, node = cache.match_prefix(seq)
            cache.lock(node)
            locked.append((pages, node))
    cache.evict(10**6)
    check_invariants(cache, allocator)
    for pages, node in locked:  # locked prefixes survive any eviction
        assert set(pages) <= allocator.in_use and all(n.lock_ref > 0 for n in [node] if n is not cache.root)
    for _, node in locked:
        cache.unlock(node)
    cache.flush()
    assert allocator.num_free == allocator.num_pages and cache.total_pages == cache.locked_pages == 0
