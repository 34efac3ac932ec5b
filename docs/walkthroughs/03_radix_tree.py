# %% [markdown]
# # Stage 03: the radix tree after three prompts
#
# Stage 03 remembers which KV pages hold which token prefixes, in a radix tree. A prompt that
# starts like an earlier one reuses those pages and computes only the rest. Here three prompts
# share a "system prompt"; two of them also share a question. Pages hold 4 tokens (only whole
# pages are cached). Run it with `python docs/walkthroughs/03_radix_tree.py`.

# %%
from stage03_radix import Engine

engine = Engine(page_size=4, kv_cache_bytes=16 << 20)
tokenizer, cache = engine.tokenizer, engine.runner.radix_cache
system = "You are a terse assistant who answers in one word. "
prompts = [system + "Q: What colour is the sky? A:",
           system + "Q: What colour is grass? A:",
           system + "Q: What colour is the sky at night? A:"]


def show(node, depth=0):
    """Print the tree: each edge's text, its pages and how many running requests lock it."""
    for child in node.children.values():
        text = tokenizer.decode(child.key).replace("\n", " ")
        print(f"{'    ' * depth}└─ {text!r}  pages {child.pages}  lock_ref {child.lock_ref}")
        show(child, depth + 1)


# %% [markdown]
# ## One prompt at a time
# After each request finishes, its prompt (and generated tokens, in whole pages) are inserted.
# `cached_tokens` says how much of each prompt came from the tree instead of being computed.

# %%
for prompt in prompts:
    out = engine.generate(prompt, max_tokens=3, temperature=0)
    print(f"{out.cached_tokens:2d} of {out.prompt_tokens} prompt tokens cached -> {out.text!r}")
    show(cache.root)
    print()

# %% [markdown]
# The first prompt computed everything and left one edge. The second shares the system prompt
# and "Q: What colour": 16 tokens, four whole pages, so that edge is split after page 3 and the
# second prompt hangs its own pages below. The third also shares " is the sky" with the first,
# but not a whole page of it (the page goes on with "?" in one and " at" in the other), so its
# match stops at the same place: sharing is page by page.
#
# ## Eviction
# Nothing runs now, so no node is locked: every cached page can be evicted (least recently used
# leaves first) when the pool runs short. `flush_cache` evicts them all.

# %%
print("pages in the tree:", cache.total_pages, " evictable:", cache.evictable_pages)
engine.flush_cache()
print("after flush:", cache.total_pages, "pages;", engine.runner.allocator.num_free, "of", engine.runner.allocator.num_pages, "free")
