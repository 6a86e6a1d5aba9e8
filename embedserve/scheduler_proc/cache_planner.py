"""How each input meets the caches: a whole-input hit, a KV prefix to extend, or a plain forward.

Pure Python, no torch. The planner owns the scheduler's side of both caches:
- the whole-input cache (all models): identical token sequence -> an embedding slot in the executor;
- the KV page pool and radix tree (causal models with last-token pooling): token prefix -> KV slots.
Prefix reuse is only correct for causal attention pooled at the last token, so encoders and
mean/CLS pooling never get a KV pool here (the launcher decides; see `CacheConfig`).

Lifecycle of one input through the KV path (page size 1, one slot per token):

    plan():    match the cached prefix of tokens[:-1] -> lock it; allocate slots for the new
               tokens (evicting unlocked LRU leaves if short; None -> the input waits its turn)
    finish():  ok     -> insert the computed tokens into the tree, unlock; a chunk that was not
                         the last keeps its prefix locked for the next chunk
               failed -> free the new slots, unlock
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedserve.messages import SeqRef
from embedserve.scheduler_proc.embedding_cache import EmbeddingCache, key_of
from embedserve.scheduler_proc.kv_page_pool import KVPagePool
from embedserve.scheduler_proc.radix_cache import RadixCache
from embedserve.scheduler_proc.request_queue import Seq


@dataclass(frozen=True)
class CacheConfig:
    kv_pool_tokens: int = 0  # 0: no KV pool (encoders, or pooling other than last token)
    radix: bool = False  # reuse cached prefixes (needs the KV pool)
    chunk_size: int = 0  # most new tokens of one input per batch through the KV pool; 0: no limit
    embedding_cache_size: int = 0  # whole-input cache entries; 0: off


@dataclass
class Planned:
    """One input's share of a batch, and what must be undone or committed when the batch ends."""

    seq: Seq
    ref: SeqRef
    key: bytes | None = None  # whole-input cache key when a slot was reserved for the result
    tokens: Sequence[int] | None = None  # the input's token ids (KV path)
    prefix_pages: list[int] = field(default_factory=list)
    new_pages: list[int] = field(default_factory=list)
    locked: Any = None  # radix node locked for this batch

    @property
    def uses_kv(self) -> bool:
        return bool(self.new_pages)


class CachePlanner:
    def __init__(self, config: CacheConfig, read_tokens: Callable[[Seq], Sequence[int]]):
        self.config = config
        self.read_tokens = read_tokens
        self.pool = KVPagePool(config.kv_pool_tokens) if config.kv_pool_tokens else None
        self.radix = RadixCache(self.pool) if self.pool is not None and config.radix else None
        self.embeddings = EmbeddingCache(config.embedding_cache_size)
        # NOTE: one input at a time may be part-way through its chunks. Each such input keeps its
        # computed prefix locked while it waits, so two of them could together lock the whole pool
        # and wait on each other forever; one alone always fits (context length <= pool).
        self.chunking: Seq | None = None

    @property
    def uses_kv(self) -> bool:
        return self.pool is not None

    def used_tokens(self) -> int:
        """KV slots neither free nor evictable: what running and waiting-chunked inputs hold."""
        if self.pool is None:
            return 0
        evictable = self.radix.evictable_size() if self.radix else 0
        return self.pool.total - self.pool.free_count - evictable

    # ---- planning -----------------------------------------------------------------------
    def plan(self, seq: Seq, budget: int | None) -> Planned | None:
        """`seq`'s part of the next batch within `budget` new tokens (None: no limit), or None to wait."""
        tokens = None
        if self.embeddings.capacity and seq.done == 0:
            tokens = self.read_tokens(seq)
            slot = self.embeddings.lookup(tokens)
            if slot is not None:
                self.embeddings.pin(slot)
                ref = SeqRef(
                    seq.rid,
                    seq.index,
                    seq.tokens,
                    seq.start,
                    0,
                    cached=seq.length,
                    emb_slot=slot,
                    emb_hit=True,
                )
                return Planned(seq, ref)
        if self.pool is not None:
            return self._plan_kv(seq, budget, tokens if tokens is not None else self.read_tokens(seq))
        if budget is not None and seq.length > budget:
            return None
        key, slot = self._reserve(tokens)
        return Planned(seq, SeqRef(seq.rid, seq.index, seq.tokens, seq.start, seq.length, emb_slot=slot), key)

    def _plan_kv(self, seq: Seq, budget: int | None, tokens: Sequence[int]) -> Planned | None:
        prefix, node = self._prefix(seq, tokens)
        remaining = seq.length - len(prefix)
        limit = min(x for x in (remaining, self.config.chunk_size or remaining, budget or remaining))
        if limit <= 0:
            return None
        final = limit == remaining
        if not final and self.chunking not in (None, seq):
            return None  # another input is part-way through its chunks: wait for it
        if self.radix is not None:
            self.radix.lock(node)  # NOTE: before allocating, or eviction could take the prefix just matched
        new_pages = self._alloc(limit)
        if new_pages is None:
            if self.radix is not None:
                self.radix.unlock(node)
            return None
        self.release_seq(seq, free_pages=False)  # this plan's lock (or prefix) replaces the old hold
        self.chunking = None if final else seq
        cached = seq.cached + max(0, len(prefix) - seq.done)
        key, slot = self._reserve(tokens) if final else (None, -1)
        ref = SeqRef(
            seq.rid,
            seq.index,
            seq.tokens,
            seq.start + len(prefix),
            limit,
            cached=cached,
            emb_slot=slot,
            final=final,
        )
        return Planned(seq, ref, key, tokens, prefix, new_pages, node if self.radix is not None else None)

    def _prefix(self, seq: Seq, tokens: Sequence[int]) -> tuple[list[int], Any]:
        if self.radix is None:
            return list(seq.held_pages), None  # earlier chunks of this input, kept outside any tree
        match = self.radix.match_prefix(tokens[: seq.length - 1])  # the last token is always computed
        return match.pages, match.node

    def _alloc(self, n: int) -> list[int] | None:
        assert self.pool is not None
        pages = self.pool.alloc(n)
        if pages is None and self.radix is not None:
            self.radix.evict(n - self.pool.free_count)
            pages = self.pool.alloc(n)
        return pages

    def _reserve(self, tokens: Sequence[int] | None) -> tuple[bytes | None, int]:
        if not self.embeddings.capacity or tokens is None:
            return None, -1
        reserved = self.embeddings.reserve(tokens)
        return (key_of(tokens), reserved[0]) if reserved is not None else (None, -1)

    # ---- after the batch ------------------------------------------------------------------
    def finish(self, plan: Planned, ok: bool, keep_going: bool) -> None:
        """Commit (ok) or undo one input's batch share; `keep_going`: its next chunk will follow."""
        ref, seq = plan.ref, plan.seq
        if ref.emb_slot >= 0:
            if not ok and plan.key is not None:
                self.embeddings.discard(plan.key)
            self.embeddings.unpin(ref.emb_slot)
        if plan.uses_kv:
            self._finish_kv(plan, ok, keep_going)
        if self.chunking is seq and not keep_going:
            self.chunking = None
        if keep_going:
            seq.done, seq.cached = ref.start - seq.start + ref.length, ref.cached

    def _finish_kv(self, plan: Planned, ok: bool, keep_going: bool) -> None:
        assert self.pool is not None
        seq, computed = plan.seq, plan.prefix_pages + plan.new_pages
        if self.radix is None:
            if not ok or not keep_going:
                self.pool.free(computed)
            seq.held_pages = computed if ok and keep_going else []
            return
        if not ok:
            self.pool.free(plan.new_pages)
        else:
            inserted = self.radix.insert(list(plan.tokens or [])[: len(computed)], computed)
            if keep_going:
                self.radix.lock(inserted.node)
                seq.locked_node = inserted.node
        self.radix.unlock(plan.locked)

    def release_seq(self, seq: Seq, free_pages: bool = True) -> None:
        """Drop what a waiting chunked input holds: when it is aborted, or when its next chunk takes over."""
        if seq.locked_node is not None and self.radix is not None:
            self.radix.unlock(seq.locked_node)
        seq.locked_node = None
        if free_pages and seq.held_pages and self.pool is not None:
            self.pool.free(seq.held_pages)
        seq.held_pages = []
        if free_pages and self.chunking is seq:  # aborted part-way through its chunks
            self.chunking = None

    def flush(self) -> None:
        if self.radix is not None:
            self.radix.flush()
        self.embeddings.flush()

    def check_integrity(self, held: list[int]) -> None:
        if self.radix is not None:
            self.radix.check_integrity(held)
        elif self.pool is not None:
            self.pool.check_integrity()
        self.embeddings.check_integrity()
