"""Prefix reuse for causal models: token ids -> KV pages in a compressed radix tree. Pure Python, no torch.

Each edge holds a run of tokens and the pages (KV slots, one per token) computed for them. A
token's KV depends on every token before it, so pages are only reusable as a whole prefix: a
lookup walks from the root. After `insert([1, 2, 3, 4])` then `insert([1, 2, 5])`:

    root ── [1,2] ──┬── [3,4]        the first edge was split where the two inputs part;
                    └── [5]          [1,2]'s pages are shared, [3,4] and [5] have their own

The caller's recipe for a sequence `t` (its last token is always recomputed: its hidden state is
the embedding, and a cache hit holds only KV):

    m = cache.match_prefix(t[:-1]); cache.lock(m.node)        # m.pages can't be evicted now
    n = len(t) - len(m.pages)
    new = pool.alloc(n)                                       # short? cache.evict(n - pool.free_count),
                                                              # retry; still None: the sequence waits
    ... the executor writes the KV of t[len(m.pages):] into `new` ...
    r = cache.insert(t, m.pages + new); cache.unlock(m.node)  # insert owns every page it is given

    chunked prefill: after each chunk, r = cache.insert(t[:done], pages_so_far); cache.lock(r.node);
                     cache.unlock(old_node); the next chunk's prefix is r.pages (NOT pages_so_far:
                     duplicates among them went back to the pool).
    abort:           pool.free(new); cache.unlock(m.node)

Every page is in exactly one place: the pool's free list, this tree, or held by a running sequence
(allocated and not yet inserted). `check_integrity(held)` proves it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from embedserve.scheduler_proc.kv_page_pool import KVPagePool


class TreeNode:
    """The node below one edge; `key` and `pages` are that edge's tokens and their KV pages."""

    __slots__ = ("children", "key", "last_access", "lock_ref", "locks_here", "pages", "parent", "uid")

    def __init__(
        self, key: tuple[int, ...], pages: list[int], parent: TreeNode | None, uid: int, now: int
    ) -> None:
        self.key = key
        self.pages = pages
        self.parent = parent  # None for the root, and for a node that was evicted
        self.children: dict[int, TreeNode] = {}  # by first token of the child's edge
        self.lock_ref = 0  # locks on this node or below it; > 0 means this edge can't be evicted
        self.locks_here = 0  # lock() calls that named this very node
        self.last_access = now  # NOTE: never older than a child's: every touch covers the whole path
        self.uid = uid  # breaks LRU ties without comparing nodes


@dataclass(slots=True)
class MatchResult:
    pages: list[int]  # KV pages of the longest cached prefix, one per token
    node: TreeNode  # where that prefix ends; lock it to keep `pages` alive


@dataclass(slots=True)
class InsertResult:
    pages: list[int]  # the tree's pages for all the inserted tokens: use these from now on
    node: TreeNode  # where the inserted tokens end; lock it to keep `pages` alive
    freed: int  # pages given back to the pool because the tree already held those tokens


class RadixCache:
    """Token-prefix -> KV page index over a `KVPagePool`; least recently used, unlocked leaves go first."""

    def __init__(self, pool: KVPagePool) -> None:
        self.pool = pool
        self._clock = 0  # NOTE: a counter, not wall time: LRU order is deterministic and testable
        self._uids = itertools.count()
        self._root = TreeNode((), [], None, next(self._uids), 0)
        self._evictable = 0  # tokens in unlocked nodes
        self._protected = 0  # tokens in locked nodes

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_cached(self) -> int:
        return self._evictable + self._protected

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """The longest cached prefix of `tokens`, refreshed as most recently used.

        An edge matched part-way is split, so the returned node ends exactly at the prefix and
        locking it protects nothing more than `pages`.
        """
        key, now = tuple(tokens), self._tick()
        node, pages, i = self._root, [], 0
        while i < len(key) and (child := node.children.get(key[i])) is not None:
            n = _common_length(child.key, key, i)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pages += child.pages
            node, i = child, i + n
        return MatchResult(pages, node)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult:
        """Cache `pages` as the KV of `tokens` and take ownership of every one of them.

        Where the tree already holds a token, the tree's page stays; the caller's page, if it is a
        different one (computed again by a request that raced another), goes back to the pool.
        Afterwards each page passed in is either in the tree or free: the caller holds none of them.
        The new part is unlocked (evictable) until the caller locks the returned node.
        """
        key, mine = tuple(tokens), list(pages)
        if len(key) != len(mine):
            raise ValueError(f"{len(key)} tokens but {len(mine)} pages")
        if len(set(mine)) != len(mine):
            raise ValueError("a page is given for two tokens")
        self.pool.require_allocated(mine, "insert takes only allocated pages, not free")
        now = self._tick()
        node, cached, duplicates, i = self._root, [], [], 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                child = self._add_leaf(node, key[i:], mine[i:], now)
                n = len(child.key)
            else:
                n = _common_length(child.key, key, i)
                if n < len(child.key):
                    child = self._split(child, n)
                child.last_access = now
                duplicates += [p for p, q in zip(mine[i : i + n], child.pages, strict=True) if p != q]
            cached += child.pages
            node, i = child, i + n
        self.pool.free(duplicates)
        return InsertResult(cached, node, len(duplicates))

    def lock(self, node: TreeNode) -> None:
        """Protect the pages from the root down to `node` from eviction. Locks nest; the root's are no-ops."""
        path = self._path_from(node)
        if path:
            node.locks_here += 1
        for n in path:
            if n.lock_ref == 0:
                self._evictable -= len(n.key)
                self._protected += len(n.key)
            n.lock_ref += 1

    def unlock(self, node: TreeNode) -> None:
        """Undo one `lock(node)`; raises ValueError if there is none to undo."""
        path = self._path_from(node)
        if not path:
            return
        if node.locks_here == 0:
            raise ValueError("unlock of a node that is not locked")
        node.locks_here -= 1
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._protected -= len(n.key)
                self._evictable += len(n.key)

    def evict(self, num_tokens: int) -> int:
        """Give at least `num_tokens` pages back to the pool if unlocked leaves allow; returns how many.

        Whole leaves go, least recently used first, so this may free more than asked; a parent left
        childless and unlocked becomes a candidate in the same call.
        """
        if num_tokens <= 0:
            return 0
        # NOTE: O(tree) per call, like SGLang's; fine while evictions are per batch, not per token.
        heap = [(n.last_access, n.uid, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            self._drop_leaf(leaf)
            freed += len(leaf.pages)
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        return freed

    def flush(self) -> None:
        """Forget everything and give every cached page back; only when no sequence is running."""
        if self._protected:
            raise RuntimeError(f"flush while {self._protected} cached tokens are locked")
        self.pool.free(self._cached_pages())
        # NOTE: a fresh root, so lock/unlock of a node from before the flush fails loudly.
        self._root = TreeNode((), [], None, next(self._uids), 0)
        self._evictable = 0

    def pretty(self) -> str:
        """The tree as indented lines `tokens -> pages` (`locked=n` when locked), children in token order."""
        lines: list[str] = []
        stack = [(child, 0) for child in _by_token(self._root)]
        while stack:
            node, depth = stack.pop()
            lock = f" locked={node.lock_ref}" if node.lock_ref else ""
            lines.append(f"{'  ' * depth}{list(node.key)} -> {node.pages}{lock}")
            stack += [(child, depth + 1) for child in _by_token(node)]
        return "\n".join(lines)

    def _tick(self) -> int:
        self._clock += 1
        self._root.last_access = self._clock
        return self._clock

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child`'s edge after `n` tokens; returns the new upper node.

            parent ──[a b c d]── child   =>   parent ──[a b]── upper ──[c d]── child

        `child` keeps its identity (and so the caller's locks and references on it) and still ends
        where it did; `upper` inherits its lock count and timestamp, so no size moves.
        """
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = TreeNode(child.key[:n], child.pages[:n], parent, next(self._uids), child.last_access)
        upper.lock_ref = child.lock_ref
        upper.children[child.key[n]] = child
        parent.children[child.key[0]] = upper
        child.key, child.pages, child.parent = child.key[n:], child.pages[n:], upper
        return upper

    def _add_leaf(self, parent: TreeNode, key: tuple[int, ...], pages: list[int], now: int) -> TreeNode:
        leaf = TreeNode(key, pages, parent, next(self._uids), now)
        parent.children[key[0]] = leaf
        self._evictable += len(key)
        return leaf

    def _drop_leaf(self, leaf: TreeNode) -> None:
        assert leaf.parent is not None and not leaf.children and leaf.lock_ref == 0
        del leaf.parent.children[leaf.key[0]]
        leaf.parent = None  # NOTE: marks it evicted: lock/unlock on it now raise
        self._evictable -= len(leaf.key)
        self.pool.free(leaf.pages)

    def _path_from(self, node: TreeNode) -> list[TreeNode]:
        """`node` and its ancestors below the root; ValueError if `node` was evicted or flushed."""
        path = []
        while node.parent is not None:
            path.append(node)
            node = node.parent
        if node is not self._root:
            raise ValueError("the node is no longer in the tree (evicted or flushed)")
        return path

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node but the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _cached_pages(self) -> list[int]:
        return [page for node in self._nodes() for page in node.pages]

    def check_integrity(self, held: Iterable[int] = ()) -> None:
        """Assert the tree's invariants, and that free + cached + `held` pages are each page exactly once.

        `held`: pages allocated from the pool and not yet inserted or freed, i.e. the new pages of
        running sequences. A matched prefix's pages are cached, not held. Idle, `held` is empty.
        """
        sizes = [0, 0]  # evictable, protected
        for node in self._nodes():
            parent = node.parent
            assert node.key and len(node.key) == len(node.pages), "an empty edge or a page count drifted"
            assert parent is not None and parent.children.get(node.key[0]) is node, "a broken link"
            below = sum(c.lock_ref for c in node.children.values())
            assert node.locks_here >= 0 and node.lock_ref == node.locks_here + below, "lock counts drifted"
            assert parent.last_access >= node.last_access, "a child was used more recently than its parent"
            sizes[node.lock_ref > 0] += len(node.key)
        assert self._root.lock_ref == 0 and not self._root.key, "the root changed"
        assert sizes == [self._evictable, self._protected], "evictable/protected sizes drifted"
        self.pool.check_integrity()
        _check_partition(self.pool.total, free=self.pool.free_pages(), cached=self._cached_pages(), held=held)


def _common_length(edge: tuple[int, ...], key: tuple[int, ...], start: int) -> int:
    """How many leading tokens of `edge` equal `key[start:]`'s."""
    if key[start : start + len(edge)] == edge:  # NOTE: the usual case, compared at C speed
        return len(edge)
    n, limit = 0, min(len(edge), len(key) - start)
    while n < limit and edge[n] == key[start + n]:
        n += 1
    return n


def _check_partition(total: int, **groups: Iterable[int]) -> None:
    """Each page in [0, total) appears exactly once across `groups`; names the group at fault if not."""
    owner: dict[int, str] = {}
    for name, pages in groups.items():
        for page, count in Counter(pages).items():
            assert 0 <= page < total, f"page {page} ({name}) is outside the pool"
            assert count == 1, f"page {page} is {name} {count} times"
            assert page not in owner, f"page {page} is both {owner[page]} and {name}"
            owner[page] = name
    leaked = sorted(set(range(total)) - owner.keys())
    assert not leaked, f"{len(leaked)} pages leaked (neither free, cached nor held): {leaked[:10]}"


def _by_token(node: TreeNode) -> list[TreeNode]:
    """`node`'s children, last token first: popped from a stack they come out in token order."""
    return sorted(node.children.values(), key=lambda c: c.key[0], reverse=True)
