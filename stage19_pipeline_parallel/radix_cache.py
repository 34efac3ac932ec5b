"""The radix-tree prefix cache (SGLang's RadixAttention).

Many prompts start the same way: a system prompt, few-shot examples, the
earlier turns of a chat. Their keys and values are identical, so computing
them again is waste. The radix tree remembers, for token sequences already
seen, which KV pages hold them:

    root ─[The cat sat]─▶ A ─[on the mat]─▶ B
                          └──[down]──────▶ C

Each edge carries whole pages of tokens and the pages that hold their K/V.
``match_prefix`` walks down as far as a new prompt agrees and returns those
pages, so prefill computes only the rest. Finished requests ``insert`` their
tokens and pages; where a new sequence leaves an edge midway, the node is
split. Requests that use a node lock it (``lock_ref``) so it is never evicted
under them; when the pool runs short, ``evict`` frees least-recently-used
unlocked leaves.

Only whole pages are cached: a page is the unit of sharing.

Stage 15: keys and values depend on the LoRA adapter that computed them, so
each adapter's prefixes live under a root of their own (``namespace``, the
adapter's name; None for the base model). The same prompt under two
adapters shares nothing. (SGLang keys its tree on the adapter too.)
"""

import heapq
import itertools

from .page_allocator import PageAllocator


class TreeNode:
    """An edge of token ids (a multiple of page_size) and the pages that hold their K/V."""

    def __init__(self, key: list[int], pages: list[int], parent: "TreeNode | None", clock: int):
        self.key = key
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.lock_ref = 0  # running requests whose cached prefix passes through here
        self.last_access = clock


class RadixCache:
    """Maps token prefixes to KV pages; shares, locks and evicts them page by page."""

    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self._clock = itertools.count()
        self.root = TreeNode([], [], None, next(self._clock))
        self.root.lock_ref = 1  # the root is never evicted
        # One more root per adapter, hung below the real one with an empty edge and locked for good:
        # locking, eviction and flushing then treat every namespace alike.
        self.roots: dict[str | None, TreeNode] = {None: self.root}
        self.total_pages = 0  # pages owned by the tree
        self.locked_pages = 0  # of those, pages in nodes some request locks

    @property
    def evictable_pages(self) -> int:
        return self.total_pages - self.locked_pages

    def _child_key(self, tokens: list[int]) -> tuple[int, ...]:
        return tuple(tokens[: self.page_size])

    def _aligned(self, n: int) -> int:
        return n - n % self.page_size

    def _common_length(self, a: list[int], b: list[int]) -> int:
        """Length of the common start of a and b, rounded down to whole pages."""
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return self._aligned(n)

    def _split(self, node: TreeNode, length: int) -> TreeNode:
        """Cut ``node``'s edge after ``length`` tokens; return the new upper node."""
        pages = length // self.page_size
        upper = TreeNode(node.key[:length], node.pages[:pages], node.parent, node.last_access)
        upper.lock_ref = node.lock_ref
        upper.parent.children[self._child_key(upper.key)] = upper
        node.key, node.pages, node.parent = node.key[length:], node.pages[pages:], upper
        upper.children[self._child_key(node.key)] = node
        return upper

    def _root_for(self, namespace: str | None) -> TreeNode:
        if namespace not in self.roots:
            self.roots[namespace] = TreeNode([], [], self.root, next(self._clock))
            self.roots[namespace].lock_ref = 1
        return self.roots[namespace]

    def match_prefix(self, tokens: list[int], namespace: str | None = None) -> tuple[list[int], TreeNode]:
        """Longest cached page-aligned prefix of ``tokens`` (computed under adapter ``namespace``):
        ``(its pages, the node where it ends)``."""
        node, pages = self._root_for(namespace), []
        for node in self._walk(tokens, namespace):
            pages += node.pages
        return pages, node

    def _walk(self, tokens: list[int], namespace: str | None):
        """The nodes a page-aligned prefix of ``tokens`` matches, root side first (a node matched
        part way is split there), each marked as just used. Stage 17 walks on past the device."""
        tokens = tokens[: self._aligned(len(tokens))]
        node, i = self._root_for(namespace), 0
        while i < len(tokens):
            child = node.children.get(self._child_key(tokens[i:]))
            if child is None:
                break
            child.last_access = next(self._clock)
            n = self._common_length(child.key, tokens[i:])
            if n < len(child.key):
                child = self._split(child, n)
            yield child
            node, i = child, i + n

    def insert(self, tokens: list[int], pages: list[int], namespace: str | None = None) -> int:
        """Cache ``tokens`` (page-aligned) held in ``pages``, computed under adapter ``namespace``;
        return how many tokens were cached already.

        The tree takes ownership of the pages past that returned length; the
        caller still owns (and must free) its pages for the part already cached.
        """
        assert len(tokens) == len(pages) * self.page_size, "insert whole pages only"
        node, i = self._root_for(namespace), 0
        while i < len(tokens):
            key = self._child_key(tokens[i:])
            child = node.children.get(key)
            if child is None:
                new = TreeNode(tokens[i:], pages[i // self.page_size :], node, next(self._clock))
                node.children[key] = new
                self.total_pages += len(new.pages)
                return i
            child.last_access = next(self._clock)
            n = self._common_length(child.key, tokens[i:])
            if n < len(child.key):
                child = self._split(child, n)
            node, i = child, i + n
        return i

    def lock(self, node: TreeNode) -> None:
        """A request starts using the prefix ending at ``node``: protect the whole path."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """The request is done with that prefix; the path may be evicted once nobody holds it."""
        while node is not self.root:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "unlocked more often than locked"
            if node.lock_ref == 0:
                self.locked_pages -= len(node.pages)
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages from least-recently-used unlocked leaves (if there are that many)."""
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_pages and leaves:
            _, _, node = heapq.heappop(leaves)
            self.allocator.free_pages(node.pages)
            freed += len(node.pages)
            self.total_pages -= len(node.pages)
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def drop_namespace(self, namespace: str) -> int:
        """Free every prefix cached under an adapter that is no longer served (none may be locked):
        an adapter loaded later under the same name must not find these keys and values."""
        root, freed = self.roots.pop(namespace, None), 0
        stack = list(root.children.values()) if root is not None else []
        while stack:
            node = stack.pop()
            assert node.lock_ref == 0, "a prefix of an unloaded adapter is still in use"
            self.allocator.free_pages(node.pages)
            freed += len(node.pages)
            stack.extend(node.children.values())
        self.total_pages -= freed
        return freed

    def flush(self) -> None:
        """Drop every cached prefix (only possible while no request holds one)."""
        if self.locked_pages:
            raise RuntimeError("cannot flush the prefix cache while requests are using it")
        self.evict(self.total_pages)

    def _nodes(self):
        stack = list(self.roots.values())
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())
