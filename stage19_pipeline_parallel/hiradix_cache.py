"""Stage 17: the radix tree over three tiers (SGLang's HiRadixCache, "HiCache").

Stage 03's tree forgets a prefix when the device pool needs its pages; the
next request that shares it prefills it again. Here each node knows where
its pages live:

    device  node.pages        the KV pool; attention reads them
    host    node.host_pages   pinned host memory (``host_kv_pool.py``)
    disk    node.disk_keys    one checked file per page (``hicache_storage.py``)

A node may be on several tiers at once. Three rules keep the tree simple:

* The device part is the top of the tree: a node on the device has its
  parent on the device. Eviction takes device *leaves*, and a load brings a
  whole path back. So ``match_prefix`` (the device pages attention can use)
  is stage 03's walk that stops at the first node off the device, and the
  nodes past it, still on the host or disk, are what a load may bring back.
* A node that is on no tier leaves the tree, with everything below it.
* A locked node (a running request's prefix, or a path being loaded) is
  never evicted from any tier.

When the device pool evicts a leaf, the write policy (SGLang's names) says
whether a host copy exists by then:

    write_back               copy it to the host now, on eviction
    write_through            copied when it was inserted
    write_through_selective  copied once it was hit twice (worth keeping)

A leaf with no host copy is dropped, as in stage 03. When the host pool is
full it evicts its own least-recently-used leaves, to files when a storage
backend is set, else for good.
"""

import dataclasses
import heapq
import tempfile
from pathlib import Path

from .cache_controller import HiCacheController
from .hicache_storage import HiCacheFile
from .host_kv_pool import HostKVPool
from .kv_cache import PagedKVPool
from .page_allocator import PageAllocator
from .radix_cache import RadixCache, TreeNode

WRITE_POLICIES = ("write_back", "write_through", "write_through_selective")
SELECTIVE_HITS = 2  # write_through_selective copies a prefix to the host once this many requests used it


class HiTreeNode(TreeNode):
    """A radix-tree node with its copies on the lower tiers."""

    def __init__(self, key, pages, parent, clock):
        super().__init__(key, pages, parent, clock)
        self.host_pages: list[int] | None = None  # where the host pool holds the same K/V
        self.disk_keys: list[str] | None = None  # the files that hold them, one per page
        self.hits = 0  # requests admitted with this node in their prefix

    @property
    def on_device(self) -> bool:
        return bool(self.pages) or not self.key  # a root (empty edge) is always "there"

    @property
    def resident(self) -> bool:
        return self.on_device or self.host_pages is not None or self.disk_keys is not None


class HiRadixCache(RadixCache):
    """A prefix cache whose evicted prefixes go to host memory (and files) and come back."""

    def __init__(self, allocator: PageAllocator, page_size: int, controller: HiCacheController, write_policy: str):
        super().__init__(allocator, page_size)
        self.root = self.roots[None] = HiTreeNode([], [], None, next(self._clock))
        self.root.lock_ref = 1
        self.controller = controller
        self.host = controller.host_pool.allocator
        self.storage: HiCacheFile | None = controller.storage
        self.write_policy = write_policy

    # ----- the tree, with tiers ----------------------------------------------------------

    def _root_for(self, namespace):
        if namespace not in self.roots:
            self.roots[namespace] = HiTreeNode([], [], self.root, next(self._clock))
            self.roots[namespace].lock_ref = 1
        return self.roots[namespace]

    def _split(self, node: HiTreeNode, length: int) -> HiTreeNode:
        pages = length // self.page_size
        upper = HiTreeNode(node.key[:length], node.pages[:pages], node.parent, node.last_access)
        upper.lock_ref, upper.hits = node.lock_ref, node.hits
        if node.host_pages is not None:
            upper.host_pages, node.host_pages = node.host_pages[:pages], node.host_pages[pages:]
        if node.disk_keys is not None:
            upper.disk_keys, node.disk_keys = node.disk_keys[:pages], node.disk_keys[pages:]
        upper.parent.children[self._child_key(upper.key)] = upper
        node.key, node.pages, node.parent = node.key[length:], node.pages[pages:], upper
        upper.children[self._child_key(node.key)] = node
        return upper

    def match_tiers(self, tokens: list[int], namespace: str | None = None) -> tuple[list[int], HiTreeNode, list[HiTreeNode]]:
        """Like ``match_prefix``, and past the device part: ``(device pages, the node where they end,
        the matched nodes below it that are on the host or disk only)``."""
        node, pages, below = self._root_for(namespace), [], []
        for node in self._walk(tokens, namespace):
            if node.on_device and not below:
                pages += node.pages
            else:
                below.append(node)
        device_end = below[0].parent if below else node
        return pages, device_end, below

    def match_prefix(self, tokens, namespace=None):
        pages, node, _ = self.match_tiers(tokens, namespace)
        return pages, node

    def insert(self, tokens: list[int], pages: list[int], namespace: str | None = None) -> int:
        """Stage 03's insert, except that a matching node that is off the device takes the caller's
        pages (its K/V are computed again, so there is nothing to load). Returns the tokens that
        were already on the device."""
        assert len(tokens) == len(pages) * self.page_size, "insert whole pages only"
        node, i, on_device = self._root_for(namespace), 0, None
        while i < len(tokens):
            child = node.children.get(self._child_key(tokens[i:]))
            if child is None:
                child = HiTreeNode(tokens[i:], pages[i // self.page_size :], node, next(self._clock))
                node.children[self._child_key(child.key)] = child
                self.total_pages += len(child.pages)
                self._written_through(child)
                return i if on_device is None else on_device
            child.last_access = next(self._clock)
            n = self._common_length(child.key, tokens[i:])
            if n < len(child.key):
                child = self._split(child, n)
            if not child.on_device:
                assert child.lock_ref == 0, "a locked node is on the device"
                on_device = i if on_device is None else on_device
                child.pages = pages[i // self.page_size : (i + n) // self.page_size]
                self.total_pages += len(child.pages)
                self._written_through(child)
            node, i = child, i + n
        return i if on_device is None else on_device

    # ----- loading back ---------------------------------------------------------------

    def load_back(self, node: HiTreeNode, below: list[HiTreeNode], free_pages: int) -> HiTreeNode:
        """Bring ``below`` (the host- or disk-only nodes under the device node ``node``) back to the
        device, as far as ``free_pages`` new device pages allow; return the node where the device
        part now ends. The caller holds a lock on ``node``; the loaded path is locked the same way.
        A file that fails its check ends the load there (the rest is computed again)."""
        ps = self.page_size
        take = []
        for child in below:
            if len(child.key) // ps > free_pages - sum(len(c.key) // ps for c in take):
                break
            take.append(child)
        read = {}
        for j, child in enumerate(take):
            if child.host_pages is None:
                read[id(child)] = self.controller.read(child.disk_keys)
                if len(read[id(child)]) < len(child.disk_keys):  # a bad file: stop before it
                    self._forget_disk(child)
                    take = take[:j]
                    break
        if not take:
            return node
        self.lock(take[-1])
        for child in take:
            new_pages = self._alloc_device(len(child.key) // ps)
            if child.host_pages is not None:
                self.controller.load(child.host_pages, new_pages)
                self.controller.stats.host_hit_tokens += len(child.key)
            else:
                self.controller.load_read(read[id(child)], new_pages)
                self.controller.stats.disk_hit_tokens += len(child.key)
            child.pages = new_pages
            self.total_pages += len(new_pages)
            self.locked_pages += len(new_pages)  # the path is locked
        self.unlock(node)
        return take[-1]

    def record_hit(self, node: HiTreeNode, device_tokens: int) -> None:
        """A request was admitted with the prefix ending at ``node``: count it, and under
        write_through_selective copy the path's nodes that became worth keeping."""
        self.controller.stats.device_hit_tokens += device_tokens
        while node.parent is not None and node.key:
            node.hits += 1
            if self.write_policy == "write_through_selective" and node.hits >= SELECTIVE_HITS:
                self._back_up(node)
            node = node.parent

    def _alloc_device(self, count: int) -> list[int]:
        if count > self.allocator.num_free:
            self.evict(count - self.allocator.num_free)
        return self.allocator.alloc_pages(count)

    # ----- eviction, tier by tier ------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` device pages from least-recently-used unlocked device leaves,
        each copied to the host first under write_back."""
        def release(node: HiTreeNode) -> int:
            if self.write_policy == "write_back":
                self._back_up(node)
            self.allocator.free_pages(node.pages)
            freed, node.pages = len(node.pages), []
            self.total_pages -= freed
            return freed

        return self._evict_lru(num_pages, self._device_leaf, release)

    def _evict_lru(self, num_pages: int, is_leaf, release) -> int:
        """Release least-recently-used leaves of one tier (``is_leaf``) until ``num_pages`` are free;
        a node left on no tier leaves the tree, and a parent that becomes a leaf joins the queue."""
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if is_leaf(n)]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_pages and leaves:
            _, _, node = heapq.heappop(leaves)
            freed += release(node)
            if not node.resident:
                self._delete(node)
            if is_leaf(node.parent):
                heapq.heappush(leaves, (node.parent.last_access, id(node.parent), node.parent))
        return freed

    def _device_leaf(self, node: HiTreeNode) -> bool:
        return bool(node.pages) and node.lock_ref == 0 and not any(c.on_device for c in node.children.values())

    def _host_leaf(self, node: HiTreeNode) -> bool:
        return (node.host_pages is not None and node.lock_ref == 0
                and not any(c.host_pages is not None for c in node.children.values()))

    def _back_up(self, node: HiTreeNode) -> None:
        """Copy a device node's pages to the host (if it has no copy there and room can be made)."""
        if node.host_pages is not None or not node.pages:
            return
        count = len(node.pages)
        if count > self.host.num_free:
            self.evict_host(count - self.host.num_free)
        if count > self.host.num_free:
            return  # the host tier is full of locked prefixes: this one is dropped when evicted
        node.host_pages = self.host.alloc_pages(count)
        self.controller.write(node.pages, node.host_pages)

    def _written_through(self, node: HiTreeNode) -> None:
        if self.write_policy == "write_through":
            self._back_up(node)

    def evict_host(self, num_pages: int) -> int:
        """Free at least ``num_pages`` host pages from least-recently-used host leaves; with a
        storage backend each is written to files first."""
        def release(node: HiTreeNode) -> int:
            if self.storage is not None and node.disk_keys is None:
                node.disk_keys = self._page_keys(node)
                self.controller.store(node.host_pages, node.disk_keys)
            self.host.free_pages(node.host_pages)
            freed, node.host_pages = len(node.host_pages), None
            return freed

        return self._evict_lru(num_pages, self._host_leaf, release)

    def _page_keys(self, node: HiTreeNode) -> list[str]:
        """The file keys of a node's pages: each page's key chains from the one before it."""
        path = []
        while node.key:
            path.append(node)
            node = node.parent
        namespace = next((name for name, root in self.roots.items() if root is node), None)
        key, keys = self.storage.root_key(namespace), []
        for part in reversed(path):
            keys = []
            for start in range(0, len(part.key), self.page_size):
                key = self.storage.page_key(key, part.key[start : start + self.page_size])
                keys.append(key)
        return keys

    def _forget_disk(self, node: HiTreeNode) -> None:
        """A node's files failed their check: drop them (and the node, if it is on no other tier)."""
        for key in node.disk_keys:
            self.storage.delete(key)
        node.disk_keys = None
        if not node.resident:
            self._delete(node)

    def _delete(self, node: HiTreeNode) -> None:
        """Take a node that is on no tier out of the tree, with what its subtree still holds off the device."""
        del node.parent.children[self._child_key(node.key)]
        stack = [node]
        while stack:
            n = stack.pop()
            assert not n.pages and n.lock_ref == 0, "a node below one on no tier is in use"
            self._drop_lower_tiers(n)
            stack.extend(n.children.values())

    def _drop_lower_tiers(self, node: HiTreeNode) -> None:
        if node.host_pages is not None:
            self.host.free_pages(node.host_pages)
            node.host_pages = None
        if node.disk_keys is not None:
            for key in node.disk_keys:
                self.storage.delete(key)
            node.disk_keys = None

    # ----- whole-tree operations --------------------------------------------------------

    def drop_namespace(self, namespace: str) -> int:
        root = self.roots.get(namespace)
        for node in self._subtree(root):
            self._drop_lower_tiers(node)
        return super().drop_namespace(namespace)

    def flush(self) -> None:
        """Drop every cached prefix on every tier (only while no request holds one)."""
        if self.locked_pages:
            raise RuntimeError("cannot flush the prefix cache while requests are using it")
        for node in list(self._nodes()):
            self._drop_lower_tiers(node)
            self.allocator.free_pages(node.pages)
        self.total_pages = 0
        for root in self.roots.values():
            root.children.clear()

    @staticmethod
    def _subtree(node: HiTreeNode | None):
        stack = list(node.children.values()) if node is not None else []
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def host_pages_held(self) -> int:
        return sum(len(n.host_pages) for n in self._nodes() if n.host_pages is not None)

    def stats(self) -> dict[str, int | float]:
        """The tiers' counts for ``Engine.stats()``, each key prefixed ``hicache_``."""
        counts = dataclasses.asdict(self.controller.stats)
        counts.update(host_pages_total=self.host.num_pages, host_pages_used=self.host.num_pages - self.host.num_free)
        return {f"hicache_{key}": value for key, value in counts.items()}


def check_hicache(args) -> None:
    """Refuse settings the hierarchical cache does not work with, saying why."""
    if args.hicache_storage_backend is not None and not args.enable_hierarchical_cache:
        raise ValueError("hicache_storage_backend is a tier of the hierarchical cache: add enable_hierarchical_cache")
    if not args.enable_hierarchical_cache:
        return
    if args.disable_radix_cache:
        raise ValueError("enable_hierarchical_cache keeps the radix cache's prefixes: drop disable_radix_cache")
    if max(args.tp_size, args.ep_size) > 1:
        raise ValueError("enable_hierarchical_cache runs its copies on rank 0 only and does not compose with tp_size or "
                         "ep_size above 1 yet; use data-parallel replicas (dp_size), each with its own host tier")


def make_prefix_cache(args, pool: PagedKVPool, allocator: PageAllocator, fingerprint: str) -> RadixCache | None:
    """The prefix cache the settings ask for: none, stage 03's tree, or the tree over three tiers."""
    if args.disable_radix_cache:
        return None
    if not args.enable_hierarchical_cache:
        return RadixCache(allocator, args.page_size)
    page_bytes = 2 * pool.k[:, : args.page_size].numel() * pool.k.element_size()
    host = HostKVPool(pool, HostKVPool.num_pages(allocator.num_pages, page_bytes, args.hicache_ratio, args.hicache_size))
    storage = None
    if args.hicache_storage_backend == "file":
        folder = args.hicache_storage_dir or Path(tempfile.gettempdir()) / "qwen3-ladder-hicache"
        storage = HiCacheFile(folder, fingerprint)
    return HiRadixCache(allocator, args.page_size, HiCacheController(pool, host, storage), args.hicache_write_policy)
