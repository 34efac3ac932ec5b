# %% [markdown]
# # Stage 17: a prefix evicted to host memory, to a file, and loaded back
#
# Three long "documents" are asked about in turn. The device pool holds only about one of them, so
# each new document evicts the one before. With the hierarchical cache on, an evicted prefix is
# copied to the host pool (`write_back`: on eviction), and when the host pool is full too, to a
# file. Each row below says where every document's cached prefix lies after a request, and which
# tier served the request's prompt. Run it with `python docs/walkthroughs/17_hicache_tiers.py`.

# %%
import tempfile
from pathlib import Path

from stage17_hicache import Engine

PAGE = 4
probe = Engine(page_size=PAGE, kv_cache_bytes=1 << 20)
page_bytes = probe.runner.pool.bytes_per_page(probe.config, PAGE, probe.runner.dtype)
probe.shutdown()

files = tempfile.mkdtemp()
engine = Engine(page_size=PAGE, kv_cache_bytes=10 * page_bytes,
                enable_hierarchical_cache=True, hicache_write_policy="write_back",
                hicache_ratio=1.0, hicache_storage_backend="file",
                hicache_storage_dir=files)
tree = engine.runner.radix_cache
print(f"device pool: {engine.runner.allocator.num_pages} pages,",
      f"host pool: {tree.host.num_pages} pages, {PAGE} tokens a page")

documents = {
    "A": "The lighthouse keeper wrote in his log every night: the wind, "
         "the ships, the colour of the sea. ",
    "B": "A recipe for bread: flour, water, salt and yeast, mixed, "
         "left to rise, shaped and baked hot. ",
    "C": "The river begins as snow on the mountain, runs through three "
         "towns and ends in a wide delta. ",
}
TIERS = ("device", "host", "disk")


def where(name: str) -> str:
    """A document's cached prefix: its device tokens, then each node below."""
    pages, _, below = tree.match_tiers(engine.tokenizer.encode(documents[name]))
    parts = [f"device {len(pages) * PAGE}"] if pages else []
    for node in below:
        tier = "host" if node.host_pages is not None else "disk"
        parts.append(f"{tier} {len(node.key)}")
    return " + ".join(parts) or "-"


def ask(name: str, question: str) -> None:
    """One request; which tier served its cached tokens; where each document is now."""
    before = engine.stats()
    out = engine.generate(documents[name] + question, max_tokens=2, temperature=0)
    after = engine.stats()
    served = []
    for tier in TIERS:
        key = f"hicache_{tier}_hit_tokens"
        if after[key] > before[key]:
            served.append(f"{after[key] - before[key]} from {tier}")
    print(f"{name}: {out.prompt_tokens} prompt tokens, {out.cached_tokens:2d} cached",
          f"({', '.join(served) or 'computed'})")
    print("    now  " + "   ".join(f"{d}: {where(d)}" for d in documents))


# %% [markdown]
# ## Round one: each document once
# Each is computed. The device pool holds one document and its question, so asking about B
# evicts A's pages, and asking about C evicts B's. Under `write_back` an evicted node is copied
# to the host first. The host pool is as small, so C's turn also pushes A from the host into files.

# %%
for name in documents:
    ask(name, "Q: what is it about? A:")

# %% [markdown]
# ## Round two: the same documents again
# Now each prompt finds its document below the device, in a file or on the host: its pages are
# loaded back (one gathered copy per node) instead of being computed, and `cached_tokens` counts
# them (24: the document's whole pages and the question's first). Loading one document evicts
# the one on the device, which moves down a tier in its turn; without the lower tiers, each of
# these six requests would have computed its whole prompt.

# %%
for name in documents:
    ask(name, "Q: how long is it? A:")

# %% [markdown]
# ## What moved
# The engine's counts (also on `/metrics` as `ladder:hicache_*`): tokens served from each tier,
# and bytes moved between them. A flush empties every tier, files included.

# %%
stats = engine.stats()
for key in ("device_hit_tokens", "host_hit_tokens", "disk_hit_tokens",
            "bytes_written", "bytes_stored", "bytes_loaded"):
    print(f"{key:18s} {stats['hicache_' + key]:>9,}")
engine.flush_cache()
print("after flush: host pages used", engine.stats()["hicache_host_pages_used"],
      "| files", len(list(Path(files).glob("*.kv"))))
