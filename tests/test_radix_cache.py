"""The KV page pool and the radix prefix cache, alone: splits, prefix hits, LRU eviction, locks, no leaks."""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest

from embedserve.scheduler_proc.kv_page_pool import KVPagePool
from embedserve.scheduler_proc.radix_cache import RadixCache, TreeNode


def fresh(total: int = 32) -> tuple[KVPagePool, RadixCache]:
    pool = KVPagePool(total)
    return pool, RadixCache(pool)


def put(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Insert `tokens` the way a request does: reuse the cached prefix, compute the rest into new pages."""
    m = cache.match_prefix(tokens)
    new = cache.pool.alloc(len(tokens) - len(m.pages))
    assert new is not None
    return cache.insert(tokens, m.pages + new).pages


# --- the page pool -------------------------------------------------------------------------------


def test_pool_allocates_all_or_nothing_lowest_pages_first():
    pool = KVPagePool(4)
    assert pool.alloc(3) == [0, 1, 2]
    assert pool.alloc(2) is None and pool.free_count == 1  # one short: takes nothing
    assert pool.alloc(0) == [] and pool.alloc(1) == [3] and pool.alloc(1) is None
    pool.check_integrity()


def test_pool_is_loud_about_double_frees_and_foreign_pages():
    pool = KVPagePool(4)
    pages = pool.alloc(2)
    assert pages is not None
    pool.free(pages[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free(pages[:1])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.free([4])
    with pytest.raises(ValueError, match="twice in one call"):
        pool.free([pages[1], pages[1]])
    assert pool.free_count == 3  # the failed calls changed nothing
    pool.free(pages[1:])
    assert pool.free_count == 4
    pool.check_integrity()


# --- structure and matching ----------------------------------------------------------------------


def test_inputs_that_part_ways_split_the_shared_edge():
    _, cache = fresh()
    put(cache, [1, 2, 3, 4])
    put(cache, [1, 2, 5])
    assert cache.pretty() == "[1, 2] -> [0, 1]\n  [3, 4] -> [2, 3]\n  [5] -> [4]"
    assert cache.total_cached() == 5
    cache.check_integrity()


def test_match_returns_the_longest_cached_prefix_and_splits_where_it_ends():
    _, cache = fresh()
    put(cache, [1, 2, 3, 4])
    assert cache.match_prefix([1, 2, 3, 4, 9]).pages == [0, 1, 2, 3]
    assert cache.match_prefix([7, 1]).pages == []
    m = cache.match_prefix([1, 2, 9])
    assert m.pages == [0, 1] and m.node.key == (1, 2)  # the node ends exactly where the match does
    assert cache.pretty() == "[1, 2] -> [0, 1]\n  [3, 4] -> [2, 3]"
    cache.check_integrity()


def test_an_empty_match_is_the_root_and_locking_it_is_harmless():
    _, cache = fresh()
    m = cache.match_prefix([])
    cache.lock(m.node)
    assert m.pages == [] and cache.protected_size() == 0
    cache.unlock(m.node)
    cache.check_integrity()


def test_insert_frees_pages_of_tokens_another_request_cached_first():
    pool, cache = fresh(16)
    a, b = pool.alloc(3), pool.alloc(3)  # two identical requests both missed and computed everything
    assert a is not None and b is not None
    assert cache.insert([1, 2, 3], a).freed == 0
    r = cache.insert([1, 2, 3], b)
    assert r.pages == a and r.freed == 3 and all(pool.is_free(p) for p in b)
    cache.check_integrity()


def test_insert_keeps_the_matched_prefix_and_frees_only_true_duplicates():
    pool, cache = fresh(16)
    first = put(cache, [1, 2])
    m = cache.match_prefix([1, 2, 3, 4])  # request X: prefix [1, 2] cached, computes [3, 4]
    x_new = pool.alloc(2)
    assert x_new is not None
    put(cache, [1, 2, 3])  # meanwhile request Y caches [1, 2, 3]
    r = cache.insert([1, 2, 3, 4], m.pages + x_new)
    assert r.pages[:2] == first and r.freed == 1 and pool.is_free(x_new[0]) and r.pages[3] == x_new[1]
    cache.check_integrity()


def test_insert_refuses_free_pages_and_mismatched_lengths():
    pool, cache = fresh(4)
    with pytest.raises(ValueError, match="not free"):
        cache.insert([1], [0])
    pages = pool.alloc(2)
    with pytest.raises(ValueError, match="2 tokens but 1 pages"):
        cache.insert([1, 2], pages[:1])
    with pytest.raises(ValueError, match="two tokens"):
        cache.insert([1, 2], pages[:1] * 2)
    cache.check_integrity(held=pages)


# --- eviction and locks --------------------------------------------------------------------------


def test_eviction_takes_least_recently_used_leaves_first():
    pool, cache = fresh()
    a, b, c = put(cache, [1, 1]), put(cache, [2, 2]), put(cache, [3, 3])
    cache.match_prefix([1, 1])  # a is now the most recent
    assert cache.evict(1) == 2 and all(pool.is_free(p) for p in b)  # a whole leaf goes
    assert cache.evict(2) == 2 and all(pool.is_free(p) for p in c)
    assert cache.match_prefix([1, 1]).pages == a
    cache.check_integrity()


def test_a_parent_left_childless_is_evicted_in_the_same_call():
    pool, cache = fresh()
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4])
    assert cache.evict(4) == 4 and cache.total_cached() == 0 and pool.free_count == 32
    cache.check_integrity()


def test_a_locked_prefix_survives_eviction_until_unlocked():
    _, cache = fresh()
    kept = put(cache, [1, 2, 3])
    put(cache, [1, 2, 4, 5])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)
    assert (cache.protected_size(), cache.evictable_size()) == (3, 2)
    assert cache.evict(100) == 2 and cache.match_prefix([1, 2, 3, 4]).pages == kept
    cache.unlock(m.node)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 3)
    assert cache.evict(1) == 1 and cache.evict(1) == 2  # the leaf [3], then its parent [1, 2]
    cache.check_integrity()


def test_a_lock_follows_its_node_through_a_split():
    _, cache = fresh()
    put(cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    cache.match_prefix([1, 2])  # splits the locked edge above the locked node
    assert cache.pretty() == "[1, 2] -> [0, 1] locked=1\n  [3, 4] -> [2, 3] locked=1"
    assert cache.evict(100) == 0
    cache.unlock(m.node)
    assert cache.evictable_size() == 4
    cache.check_integrity()


def test_locks_nest_and_an_unmatched_unlock_is_an_error():
    _, cache = fresh()
    put(cache, [1, 2])
    m = cache.match_prefix([1, 2])
    cache.lock(m.node)
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.protected_size() == 2
    cache.unlock(m.node)
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(m.node)
    cache.check_integrity()


def test_evicted_and_flushed_nodes_cannot_be_locked():
    _, cache = fresh()
    put(cache, [1])
    gone = cache.match_prefix([1]).node
    cache.evict(1)
    with pytest.raises(ValueError, match="no longer in the tree"):
        cache.lock(gone)
    put(cache, [2])
    old = cache.match_prefix([2]).node
    cache.flush()
    with pytest.raises(ValueError, match="no longer in the tree"):
        cache.lock(old)


def test_flush_returns_every_page_and_is_refused_while_locked():
    pool, cache = fresh(8)
    put(cache, [1, 2, 3])
    put(cache, [4, 5])
    m = cache.match_prefix([4, 5])
    cache.lock(m.node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.flush()
    cache.unlock(m.node)
    cache.flush()
    assert pool.free_count == 8 and cache.total_cached() == 0 and cache.pretty() == ""
    cache.check_integrity()


def test_check_integrity_catches_a_leaked_page():
    pool, cache = fresh(8)
    held = pool.alloc(2)
    cache.check_integrity(held=held)
    with pytest.raises(AssertionError, match="leaked"):
        cache.check_integrity()
    with pytest.raises(AssertionError, match="both free and held"):
        cache.check_integrity(held=[*held, pool.free_pages()[0]])


def test_chunked_prefill_grows_one_locked_sequence():
    pool, cache = fresh(16)
    t = list(range(10))
    m = cache.match_prefix(t[:-1])
    node, pages, done = m.node, m.pages, 0
    cache.lock(node)
    for end in (4, 8, 10):
        new = pool.alloc(end - done)
        assert new is not None
        if end == 8:  # another request cached the first 6 tokens meanwhile
            put(cache, t[:6])
        r = cache.insert(t[:end], pages + new)
        assert r.pages[: len(pages)] == pages  # locked pages never move
        cache.lock(r.node)
        cache.unlock(node)
        node, pages, done = r.node, r.pages, end
        assert cache.protected_size() == end
        cache.check_integrity()
    cache.unlock(node)
    assert cache.match_prefix(t).pages == pages and cache.evictable_size() == 10
    assert pool.free_count + cache.total_cached() == 16
    cache.check_integrity()


# --- randomized against a naive model ------------------------------------------------------------


class NaiveCache:
    """Every cached prefix as a dict entry: slow, obviously right, same LRU and lock rules per token."""

    def __init__(self) -> None:
        self.page: dict[tuple[int, ...], int] = {}  # prefix -> page of its last token
        self.used: dict[tuple[int, ...], int] = {}
        self.locks: Counter[tuple[int, ...]] = Counter()
        self.clock = 0

    def match(self, tokens: tuple[int, ...]) -> list[int]:
        self.clock += 1
        n = 0
        while n < len(tokens) and tokens[: n + 1] in self.page:
            n += 1
            self.used[tokens[:n]] = self.clock
        return [self.page[tokens[: i + 1]] for i in range(n)]

    def insert(self, tokens: tuple[int, ...], pages: list[int]) -> tuple[list[int], list[int]]:
        self.clock += 1
        duplicates = []
        for i, page in enumerate(pages):
            prefix = tokens[: i + 1]
            if prefix not in self.page:
                self.page[prefix] = page
            elif self.page[prefix] != page:
                duplicates.append(page)
            self.used[prefix] = self.clock
        return [self.page[tokens[: i + 1]] for i in range(len(tokens))], duplicates

    def lock(self, prefix: tuple[int, ...], delta: int) -> None:
        for i in range(1, len(prefix) + 1):
            self.locks[prefix[:i]] += delta

    def evict(self, n: int) -> set[int]:
        """Evict exactly `n` tokens, least recently used unlocked leaf token first."""
        freed = set()
        for _ in range(n):
            parents = {p[:-1] for p in self.page}
            leaves = [p for p in self.page if p not in parents and not self.locks[p]]
            victim = min(leaves, key=lambda p: self.used[p])
            freed.add(self.page.pop(victim))
            del self.used[victim]
        return freed

    def evictable(self) -> int:
        return sum(1 for p in self.page if not self.locks[p])


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_agree_with_a_naive_model(seed: int):
    rng = random.Random(seed)
    pool, cache, naive = *fresh(48), NaiveCache()
    locked: list[tuple[TreeNode, tuple[int, ...]]] = []
    seen: list[tuple[int, ...]] = [()]

    def some_tokens() -> tuple[int, ...]:
        base = rng.choice(seen)[: rng.randint(0, 8)]  # often a prefix or extension of an earlier one
        return base + tuple(rng.randrange(3) for _ in range(rng.randint(0, 5)))

    def evict(n: int) -> None:
        free_before = set(pool.free_pages())
        evictable_before = cache.evictable_size()
        freed = cache.evict(n)
        assert freed >= min(n, evictable_before)
        assert set(pool.free_pages()) - free_before == naive.evict(freed)

    def insert(tokens: tuple[int, ...]) -> None:
        m = cache.match_prefix(tokens)
        assert m.pages == naive.match(tokens)
        reused = rng.randint(0, len(m.pages))  # this request matched only part of what is cached now
        cache.lock(m.node)
        naive.lock(tokens[: len(m.pages)], +1)
        need = len(tokens) - reused
        if pool.free_count < need:
            evict(need - pool.free_count)
        new = pool.alloc(need)
        if new is not None:
            r = cache.insert(tokens, m.pages[:reused] + new)
            expected, duplicates = naive.insert(tokens, m.pages[:reused] + new)
            assert r.pages == expected and r.freed == len(duplicates)
            assert all(pool.is_free(p) for p in duplicates)
            seen.append(tokens)
        cache.unlock(m.node)
        naive.lock(tokens[: len(m.pages)], -1)

    for _ in range(4000):
        op = rng.random()
        if op < 0.35:
            insert(some_tokens())
        elif op < 0.6:
            tokens = some_tokens()
            assert cache.match_prefix(tokens).pages == naive.match(tokens)
        elif op < 0.75:
            tokens = some_tokens()
            m = cache.match_prefix(tokens)
            naive.match(tokens)
            cache.lock(m.node)
            prefix = tokens[: len(m.pages)]
            naive.lock(prefix, +1)
            locked.append((m.node, prefix))
        elif op < 0.87 and locked:
            node, prefix = locked.pop(rng.randrange(len(locked)))
            cache.unlock(node)
            naive.lock(prefix, -1)
        elif op < 0.995:
            evict(rng.randint(1, 12))
        elif not locked:
            cache.flush()
            naive = NaiveCache()
        cache.check_integrity()
        assert cache.total_cached() == len(naive.page) and cache.evictable_size() == naive.evictable()


# --- the whole flow: 10,000 requests through a small pool ----------------------------------------


@dataclass
class Running:
    tokens: tuple[int, ...]
    chunk: int  # tokens computed per batch (chunked prefill when shorter than the input)
    node: TreeNode
    pages: list[int]  # the tree's pages for tokens[:done], locked through `node`
    new: list[int] = field(default_factory=list)  # held pages of the chunk in flight
    done: int = 0


def test_ten_thousand_requests_under_a_small_pool_leak_nothing():
    rng = random.Random(1234)
    total = 96
    pool, cache = fresh(total)
    kv: list[tuple[int, ...] | None] = [
        None
    ] * total  # what the "executor" wrote: the prefix each page encodes
    prompts = [tuple(rng.randrange(40) for _ in range(rng.randint(4, 30))) for _ in range(8)]
    waiting: deque[tuple[int, ...]] = deque()
    running: list[Running] = []
    stats: Counter[str] = Counter()

    def new_input() -> tuple[int, ...]:
        prompt = rng.choice(prompts)
        if rng.random() < 0.2:
            return prompt[: rng.randint(1, len(prompt))]  # identical to, or a prefix of, a prompt
        return prompt + tuple(rng.randrange(40) for _ in range(rng.randint(1, 10)))

    def read(pages: list[int], tokens: tuple[int, ...]) -> None:
        bad = [i for i, p in enumerate(pages) if kv[p] != tokens[: i + 1]]
        assert not bad, f"pages for positions {bad} were overwritten while still in use"

    def admit(tokens: tuple[int, ...]) -> None:
        m = cache.match_prefix(tokens[:-1])
        cache.lock(m.node)
        read(m.pages, tokens)
        stats["hit_tokens"] += len(m.pages)
        running.append(Running(tokens, rng.choice([8, 5, 1000]), m.node, m.pages, done=len(m.pages)))

    def alloc(n: int) -> list[int] | None:
        pages = pool.alloc(n)
        if pages is None:
            stats["evicted"] += cache.evict(n - pool.free_count)
            pages = pool.alloc(n)
        return pages

    def finish_chunk(seq: Running) -> None:
        end = seq.done + len(seq.new)
        for i, page in enumerate(seq.new):
            kv[page] = seq.tokens[: seq.done + i + 1]
        read(seq.pages, seq.tokens)
        r = cache.insert(seq.tokens[:end], seq.pages + seq.new)
        assert r.pages[: seq.done] == seq.pages
        read(r.pages, seq.tokens)
        stats["duplicates"] += r.freed
        if end < len(seq.tokens):
            cache.lock(r.node)
        cache.unlock(seq.node)
        seq.node, seq.pages, seq.new, seq.done = r.node, r.pages, [], end

    def step() -> None:
        while waiting and len(running) < 6:
            admit(waiting.popleft())
        progressed = False
        for seq in running:
            if not seq.new:
                seq.new = alloc(min(seq.chunk, len(seq.tokens) - seq.done)) or []
                stats["waited"] += not seq.new
            progressed |= bool(seq.new)
        for seq in list(running):
            if seq.new and rng.random() < 0.05:  # the client went away mid-batch
                pool.free(seq.new)
                cache.unlock(seq.node)
                running.remove(seq)
                stats["aborted"] += 1
            elif seq.new and rng.random() < 0.6:
                finish_chunk(seq)
                if seq.done == len(seq.tokens):
                    running.remove(seq)
                    stats["finished"] += 1
        if running and not progressed:  # every running input waits on pages that locks pin: shed one
            cache.unlock(running.pop(rng.randrange(len(running))).node)
            stats["shed"] += 1

    submitted = ticks = 0
    while submitted < 10_000 or waiting or running:
        ticks += 1
        if submitted < 10_000 and ticks % 40 < 30:  # bursts, so the server goes idle now and then
            for _ in range(min(rng.randint(0, 2), 10_000 - submitted)):
                waiting.append(new_input())
                submitted += 1
        step()
        cache.check_integrity(held=[p for seq in running for p in seq.new])
        if not waiting and not running:
            stats["idle"] += 1
            assert cache.evictable_size() == cache.total_cached() == total - pool.free_count
            if rng.random() < 0.05:
                cache.flush()
                assert pool.free_count == total
                stats["flushes"] += 1
    assert stats["finished"] + stats["aborted"] + stats["shed"] == 10_000
    for counter in ("hit_tokens", "duplicates", "evicted", "waited", "aborted", "idle", "flushes"):
        assert stats[counter] > 0, f"the simulation never exercised {counter}: {stats}"
    cache.check_integrity()
    cached = cache.total_cached()
    assert cache.evict(total) == cached and pool.free_count == total  # idle: everything is evictable
