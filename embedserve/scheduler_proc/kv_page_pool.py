"""The KV page pool: which token slots of the executor's KV cache are free. Pure Python, no torch.

A page holds one token's K and V in every layer (page size 1) and is named by an int in [0, total).
The executor owns the memory; the scheduler owns this bookkeeping and tells the executor which
pages to write and read. A page is free here, cached in the radix tree, or held by a running
sequence; the tree's `check_integrity(held=...)` proves the three add up to `total`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class KVPagePool:
    """A free list of page ids with loud errors: a double free or a foreign page raises ValueError."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"a pool cannot hold {total} pages")
        self.total = total
        # NOTE: popped from the end, so the lowest ids go out first (easier to read in logs and tests).
        self._free = list(range(total - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * total

    @property
    def free_count(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Take `n` pages, or none at all (None) when fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[: -n - 1 : -1]  # the last n, in ascending order when never freed
        del self._free[-n:]
        for page in pages:
            self._is_free[page] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Give pages back. Checked in full before any is taken, so a bad call changes nothing."""
        pages = list(pages)
        self.require_allocated(pages, "double free of")
        if len(set(pages)) != len(pages):
            raise ValueError("a page is freed twice in one call")
        for page in pages:
            self._is_free[page] = 1
        self._free.extend(pages)

    def require_allocated(self, pages: Sequence[int], problem: str = "not allocated:") -> None:
        """ValueError unless every page is in the pool and not free."""
        if pages and (min(pages) < 0 or max(pages) >= self.total):
            bad = next(p for p in pages if not 0 <= p < self.total)
            raise ValueError(f"page {bad} is outside the pool [0, {self.total})")
        # NOTE: map over the bytearray runs at C speed; insert checks every page of long inputs.
        if any(map(self._is_free.__getitem__, pages)):
            raise ValueError(f"{problem} page {next(p for p in pages if self._is_free[p])}")

    def is_free(self, page: int) -> bool:
        if not 0 <= page < self.total:
            raise ValueError(f"page {page} is outside the pool [0, {self.total})")
        return bool(self._is_free[page])

    def free_pages(self) -> list[int]:
        """A copy of the free list, for integrity checks."""
        return list(self._free)

    def check_integrity(self) -> None:
        assert len(set(self._free)) == len(self._free), "a page is on the free list twice"
        assert all(0 <= p < self.total for p in self._free), "a foreign page is on the free list"
        assert sum(self._is_free) == len(self._free), "free flags and free list disagree"
        assert all(self._is_free[p] for p in self._free), "free flags and free list disagree"
