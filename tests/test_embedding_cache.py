"""The whole-input embedding cache index, alone: LRU reuse, pins, discard, capacity 0, and a naive model."""

from __future__ import annotations

import random
from array import array

import pytest

from embedserve.scheduler_proc.embedding_cache import EmbeddingCache, key_of


def cached(cache: EmbeddingCache, tokens: tuple[int, ...]) -> int:
    """Reserve a slot for `tokens` and finish the batch that wrote it (reserve pins once)."""
    got = cache.reserve(tokens)
    assert got is not None
    cache.unpin(got[0])
    return got[0]


def test_a_miss_then_a_hit_on_the_same_slot():
    cache = EmbeddingCache(4)
    assert cache.lookup((1, 2, 3)) is None
    assert cache.reserve((1, 2, 3)) == (0, None)  # a free slot: nothing evicted
    assert cache.lookup((1, 2, 3)) == 0 and cache.lookup((1, 2)) is None and cache.lookup((3, 2, 1)) is None
    cache.check_integrity()


def test_tuples_lists_and_int32_bytes_are_one_key():
    cache = EmbeddingCache(2)
    slot = cached(cache, (7, 70000, -1))
    assert cache.lookup([7, 70000, -1]) == slot
    assert cache.lookup(array("i", [7, 70000, -1]).tobytes()) == slot
    assert key_of((1, 0)) != key_of((256,))  # full bytes compared: no two inputs share a key


def test_the_least_recently_used_entry_is_reused_first():
    cache = EmbeddingCache(3)
    a, b, c = cached(cache, (1,)), cached(cache, (2,)), cached(cache, (3,))
    assert cache.lookup((1,)) == a  # a hit makes (1,) the most recent
    assert cache.reserve((4,)) == (b, key_of((2,)))
    cache.unpin(b)
    assert cache.reserve((5,)) == (c, key_of((3,)))
    assert cache.lookup((2,)) is None and cache.lookup((1,)) == a
    cache.check_integrity()


def test_pinned_slots_are_never_reused():
    cache = EmbeddingCache(2)
    first = cache.reserve((1,))  # its batch is still writing it
    b = cached(cache, (2,))
    cache.pin(b)  # a batch reads (2,)'s embedding
    assert (
        first is not None and cache.reserve((3,)) is None
    )  # every slot is busy: the caller computes without caching
    cache.unpin(first[0])
    assert cache.reserve((3,)) == (first[0], key_of((1,)))
    cache.check_integrity()


def test_an_input_already_cached_or_being_cached_gets_no_second_slot():
    cache = EmbeddingCache(4)
    first = cache.reserve((1, 2))  # a chunked input reserved it after an identical one missed
    assert first is not None and cache.reserve((1, 2)) is None and len(cache) == 1
    assert cache.lookup((1, 2)) == first[0]
    cache.check_integrity()


def test_pins_nest():
    cache = EmbeddingCache(1)
    slot = cached(cache, (1,))
    cache.pin(slot)
    cache.pin(slot)
    cache.unpin(slot)
    assert cache.reserve((2,)) is None
    cache.unpin(slot)
    assert cache.reserve((2,)) == (slot, key_of((1,)))


def test_a_discarded_slot_goes_free_only_when_its_last_pin_goes():
    cache = EmbeddingCache(2)
    got = cache.reserve((1,))  # its batch failed before writing
    assert got is not None
    slot = got[0]
    assert cache.discard((1,)) and not cache.discard((1,))
    assert cache.lookup((1,)) is None
    other = cache.reserve((2,))
    assert other is not None and other[0] != slot and cache.reserve((3,)) is None  # the orphan stays out
    cache.check_integrity()
    cache.unpin(slot)
    assert cache.reserve((3,)) == (slot, None)
    cache.check_integrity()


def test_misuse_is_loud():
    cache = EmbeddingCache(2)
    slot = cached(cache, (1,))
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin(slot)
    with pytest.raises(ValueError, match="holds no entry"):
        cache.pin(1)
    with pytest.raises(ValueError, match="outside"):
        cache.pin(2)


def test_flush_forgets_everything_and_waits_for_pins():
    cache = EmbeddingCache(2)
    slot = cached(cache, (1,))
    cache.pin(slot)
    with pytest.raises(RuntimeError, match="pinned"):
        cache.flush()
    cache.unpin(slot)
    cache.flush()
    assert cache.lookup((1,)) is None and len(cache) == 0 and cache.reserve((1,)) == (0, None)
    cache.check_integrity()


def test_capacity_zero_disables_the_cache():
    cache = EmbeddingCache(0)
    assert cache.reserve((1,)) is None and cache.lookup((1,)) is None and not cache.discard((1,))
    cache.flush()
    cache.check_integrity()


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_agree_with_a_naive_model(seed: int):
    rng = random.Random(seed)
    capacity = 6
    cache = EmbeddingCache(capacity)
    lru: list[tuple[bytes, int]] = []  # (key, slot), least recently used first
    pins = [0] * capacity
    orphans: set[int] = set()  # discarded while pinned

    def some_tokens() -> tuple[int, ...]:
        return tuple(rng.randrange(3) for _ in range(rng.randint(0, 2)))  # 13 inputs for 6 slots: many hits

    def position(key: bytes) -> int | None:
        return next((i for i, (k, _) in enumerate(lru) if k == key), None)

    for _ in range(5000):
        op, tokens = rng.random(), some_tokens()
        key, pinned = key_of(tokens), [s for s in range(capacity) if pins[s]]
        i = position(key)
        if op < 0.35:
            slot = cache.lookup(tokens)
            assert slot == (None if i is None else lru[i][1])
            if i is not None:
                lru.append(lru.pop(i))
        elif op < 0.6:
            got = cache.reserve(tokens)
            if i is not None:
                assert got is None
                continue
            victims = [k for k, s in lru if not pins[s]]
            if len(lru) + len(orphans) == capacity and not victims:
                assert got is None
                continue
            assert got is not None
            slot, evicted = got
            if len(lru) + len(orphans) < capacity:
                assert evicted is None and slot not in {s for _, s in lru} | orphans
            else:
                assert evicted == victims[0] and (evicted, slot) in lru
                lru.remove((evicted, slot))
            lru.append((key, slot))
            pins[slot] = 1
        elif op < 0.68 and lru:
            slot = rng.choice(lru)[1]
            cache.pin(slot)
            pins[slot] += 1
        elif op < 0.93 and pinned:
            slot = rng.choice(pinned)
            cache.unpin(slot)
            pins[slot] -= 1
            if not pins[slot]:
                orphans.discard(slot)
        elif op < 0.98:
            assert cache.discard(tokens) == (i is not None)
            if i is not None:
                _, slot = lru.pop(i)
                if pins[slot]:
                    orphans.add(slot)
        elif not pinned:
            cache.flush()
            lru.clear()
        cache.check_integrity()
        assert len(cache) == len(lru)
