# %% [markdown]
# # Stage 02: watch a page table fill up
#
# Stage 02 stores keys and values in one pool of fixed-size *pages*. A request owns a list of
# page numbers, its **page table**; token `i` lives in page `page_table[i // page_size]` at offset
# `i % page_size`. Here the pages hold 4 tokens, so a new page is taken every 4 tokens. Run it with
# `python docs/walkthroughs/02_page_table.py`.

# %%
from stage02_paged import Engine

engine = Engine(page_size=4, kv_cache_bytes=8 << 20)
runner = engine.runner
print(f"pool: {runner.allocator.num_pages} pages of {runner.page_size} tokens, {runner.allocator.num_free} free")

# %% [markdown]
# ## Every step, who holds which pages
# `ModelRunner.step` runs one forward for a batch. We wrap it to print, after each step, every
# request's length and page table. The prompt's pages are all taken at the first step (prefill);
# then one more every 4 generated tokens.

# %%
original_step = runner.step


def traced_step(requests):
    tokens = original_step(requests)
    for r in requests:
        print(f"  request {r.id}: {r.num_cached:2d} tokens cached -> pages {r.page_table}")
    print(f"  free pages: {runner.allocator.num_free}")
    return tokens


runner.step = traced_step
outputs = engine.generate_batch(["The capital of France is", "Pages make memory"], max_tokens=6, temperature=0)
for out in outputs:
    print(repr(out.text))

# %% [markdown]
# ## Pages are not contiguous, and they come back
# The two requests' pages interleave in the pool: nothing needs a contiguous region, so nothing
# fragments. When a request finishes its pages return to the allocator: the pool is whole again.

# %%
print("free pages after both finished:", runner.allocator.num_free, "of", runner.allocator.num_pages)
assert runner.allocator.num_free == runner.allocator.num_pages

# %% [markdown]
# ## Where one token's key lives
# The pool is flat over *slots* (`slot = page * page_size + offset`). The device copy of the page
# tables (`DevicePageTables`) lets a whole batch turn positions into slots in one tensor call.

# %%
page_table, page_size = [7, 2, 9], runner.page_size
for position in (0, 5, 11):
    page = page_table[position // page_size]
    print(f"token {position:2d} -> page {page}, offset {position % page_size}, slot {page * page_size + position % page_size}")
