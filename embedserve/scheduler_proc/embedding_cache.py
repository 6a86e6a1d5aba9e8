"""Whole-input embedding cache index: an identical token sequence -> a slot of the executor's table.

Pure Python, no torch. The executor holds `capacity` embeddings in a fixed table; this index,
in the scheduler, says which input each slot holds and which slot to reuse next. A slot is in
exactly one state:

    free ──reserve──> cached, pinned ──unpin──> cached ──reserve (LRU, unpinned)──> cached for a new key
                         │  (lookup hits refresh LRU; pin/unpin nest)
                         └──discard while pinned──> orphan ──last unpin──> free

NOTE: the key is the full token sequence (native int32 bytes), held as the dict key, so a hash
collision can never return another input's embedding: dict lookup compares the bytes in full.
NOTE: an entry is visible to `lookup` from the moment it is reserved, before its batch has written
the slot. That is sound only because the executor runs batches in the order they are sent, so a
reader scheduled later reads after the writer. If a batch fails, `discard` the keys it reserved.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeAlias

Tokens: TypeAlias = bytes | bytearray | memoryview | Sequence[int]

assert array("i").itemsize == 4, "keys are int32 token bytes"


def key_of(tokens: Tokens) -> bytes:
    """The cache key: the tokens as native int32 bytes (bytes-like input is taken as already so)."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        return bytes(tokens)
    return array("i", tokens).tobytes()


class EmbeddingCache:
    """LRU index of `capacity` embedding slots; capacity 0 disables it (every lookup misses)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity {capacity} < 0")
        self.capacity = capacity
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._key_at: list[bytes | None] = [None] * capacity  # None: free or orphaned
        self._pins = [0] * capacity  # batches in flight that write or read the slot
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: slot 0 first

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, tokens: Tokens) -> int | None:
        """The slot holding `tokens`' embedding, refreshed as most recently used; None on a miss."""
        if not self.capacity:
            return None
        key = key_of(tokens)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
        return slot

    def reserve(self, tokens: Tokens) -> tuple[int, bytes | None] | None:
        """A slot for `tokens`' embedding, and the key evicted to make room (None if a slot was free).

        The slot comes back pinned once, for the batch that writes it: unpin it when that batch is
        done. None (compute without caching) when the cache is disabled, every slot is pinned, or
        `tokens` is already cached or being cached: an identical input (a chunked one, say) may
        have reserved it since this one's lookup missed, and a second slot would be wasted.
        """
        if not self.capacity:
            return None
        key = key_of(tokens)
        if key in self._slots:
            return None
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            # NOTE: pinned entries were used recently, so they sit at the far end: this scan is short.
            evicted = next((k for k, s in self._slots.items() if not self._pins[s]), None)
            if evicted is None:
                return None
            slot = self._slots.pop(evicted)
        self._slots[key] = slot
        self._key_at[slot] = key
        self._pins[slot] = 1
        return slot, evicted

    def pin(self, slot: int) -> None:
        """Keep `slot` from being reused while a batch reads it (after a lookup hit)."""
        if self._key_at[self._checked(slot)] is None:
            raise ValueError(f"slot {slot} holds no entry")
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        """Undo one pin (or reserve's pin); a discarded slot goes free at its last unpin."""
        if not self._pins[self._checked(slot)]:
            raise ValueError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        if not self._pins[slot] and self._key_at[slot] is None:
            self._free.append(slot)

    def discard(self, tokens: Tokens) -> bool:
        """Forget `tokens`' entry (its slot was never written); returns whether there was one."""
        slot = self._slots.pop(key_of(tokens), None) if self.capacity else None
        if slot is None:
            return False
        self._key_at[slot] = None
        if not self._pins[slot]:
            self._free.append(slot)
        return True

    def flush(self) -> None:
        """Forget every entry; refused while any slot is pinned (only flush when idle)."""
        if any(self._pins):
            raise RuntimeError("flush while slots are pinned")
        self._slots.clear()
        self._key_at = [None] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))

    def _checked(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside [0, {self.capacity})")
        return slot

    def check_integrity(self) -> None:
        assert len(self._key_at) == len(self._pins) == self.capacity, "tables resized"
        assert all(p >= 0 for p in self._pins), "a negative pin count"
        for key, slot in self._slots.items():
            assert self._key_at[slot] == key, f"slot {slot} does not hold its key"
        assert len(set(self._slots.values())) == len(self._slots), "two keys share a slot"
        assert len(set(self._free)) == len(self._free), "a slot is free twice"
        for slot in self._free:
            assert self._key_at[slot] is None and not self._pins[slot], f"free slot {slot} is in use"
        orphans = [s for s in range(self.capacity) if self._key_at[s] is None and self._pins[s]]
        assert len(self._slots) + len(self._free) + len(orphans) == self.capacity, "a slot leaked"
