"""The scheduler's cache policy without a model: whole-input hits, prefix reuse, chunking, pool pressure."""

from __future__ import annotations

import random
from array import array

from embedserve.messages import RequestMeta, RingRef, TokenizedRequest
from embedserve.scheduler_proc.cache_planner import CacheConfig
from embedserve.scheduler_proc.scheduler import Scheduler


class FakeTokens:
    """Stands in for the token ring: each request's ids by its block offset."""

    def __init__(self) -> None:
        self.blocks: dict[int, list[int]] = {}
        self.next_offset = 0

    def request(self, rid: str, inputs: list[list[int]]) -> TokenizedRequest:
        offset, self.next_offset = self.next_offset, self.next_offset + 1
        self.blocks[offset] = [t for ids in inputs for t in ids]
        meta = RequestMeta(rid=rid, api="openai", model="m", lengths=[len(i) for i in inputs])
        return TokenizedRequest(meta=meta, tokens=RingRef(offset, 4 * len(self.blocks[offset])))

    def read(self, seq) -> list[int]:
        return self.blocks[seq.tokens.offset][seq.start : seq.start + seq.length]


def make(pool=0, radix=True, chunk=0, emb=0, prefill=1000, seqs=64) -> tuple[Scheduler, FakeTokens]:
    tokens = FakeTokens()
    caches = CacheConfig(
        kv_pool_tokens=pool, radix=radix and pool > 0, chunk_size=chunk, embedding_cache_size=emb
    )
    return Scheduler(prefill, seqs, caches=caches, read_tokens=tokens.read), tokens


def run_all(s: Scheduler) -> list:
    """Schedule and finish batches until idle; returns every batch as sent."""
    sent = []
    while (formed := s.next_batch()) is not None:
        batch, stats = formed
        sent.append((batch, stats))
        s.finish_batch(batch.batch_id)
        s.check_integrity()
    return sent


def test_identical_input_is_a_whole_input_hit():
    s, t = make(emb=8)
    s.add_request(t.request("a", [[1, 2, 3, 4]]))
    [(first, _)] = run_all(s)
    assert first.seqs[0].emb_slot >= 0 and not first.seqs[0].emb_hit
    s.add_request(t.request("b", [[1, 2, 3, 4], [9, 9]]))
    [(second, stats)] = run_all(s)
    hit, miss = second.seqs
    assert hit.emb_hit and hit.length == 0 and hit.cached == 4 and hit.emb_slot == first.seqs[0].emb_slot
    assert not miss.emb_hit and miss.length == 2
    assert stats.cached_tokens == 4 and stats.new_tokens == 2


def test_shared_prefix_is_reused_and_the_last_token_always_computed():
    s, t = make(pool=100)
    prefix = list(range(100, 160))
    s.add_request(t.request("a", [[*prefix, 1, 2]]))
    run_all(s)
    s.add_request(t.request("b", [[*prefix, 7, 8, 9]]))
    [(batch, stats)] = run_all(s)
    assert batch.kv.prefix_lens == [60] and batch.seqs[0].length == 3 and batch.seqs[0].cached == 60
    assert stats.cached_tokens == 60
    s.add_request(t.request("c", [[*prefix, 7, 8, 9]]))  # the seed's repeat: only the last token is new
    [(again, _)] = run_all(s)
    assert again.seqs[0].length == 1 and again.seqs[0].cached == 62
    assert len(array("i", again.kv.prefix_slots)) == 62 and len(array("i", again.kv.new_slots)) == 1


def test_no_prefix_reuse_without_the_radix_tree():
    s, t = make(pool=100, radix=False)
    for rid in ("a", "b"):
        s.add_request(t.request(rid, [[5, 6, 7, 8]]))
        [(batch, _)] = run_all(s)
        assert batch.kv.prefix_lens == [0] and batch.seqs[0].cached == 0
    assert s.caches.pool.free_count == 100


def test_a_long_input_runs_in_chunks_and_keeps_its_place():
    for radix in (True, False):
        s, t = make(pool=64, radix=radix, chunk=4)
        s.add_request(t.request("long", [list(range(1, 11))]))
        s.add_request(t.request("short", [[50, 51]]))
        sent = run_all(s)
        long_parts = [
            (b.seqs[0].length, b.kv.prefix_lens[0], b.seqs[0].final)
            for b, _ in sent
            if b.seqs[0].rid == "long"
        ]
        assert long_parts == [(4, 0, False), (4, 4, False), (2, 8, True)]
        # FCFS: the long input's first chunk goes first; the short one may share its batch
        assert [q.rid for q in sent[0][0].seqs] == ["long", "short"]
        assert s.idle


def test_an_input_that_cannot_get_slots_waits_in_order_and_never_fails():
    s, t = make(pool=16, radix=True)
    s.add_request(t.request("a", [list(range(1, 11))]))
    s.add_request(t.request("b", [list(range(20, 30))]))
    first, _ = s.next_batch()
    assert [q.rid for q in first.seqs] == ["a"]  # b's 10 tokens do not fit beside a's
    assert s.next_batch() is None
    s.finish_batch(first.batch_id)  # a's slots become evictable
    second, _ = s.next_batch()
    assert [q.rid for q in second.seqs] == ["b"]
    s.finish_batch(second.batch_id)
    s.check_integrity()


def test_aborting_a_chunked_input_between_chunks_releases_its_slots():
    s, t = make(pool=32, radix=False, chunk=4)
    s.add_request(t.request("gone", [list(range(1, 13))]))
    batch, _ = s.next_batch()
    s.finish_batch(batch.batch_id)
    assert s.caches.pool.free_count == 28  # the first chunk's slots wait for the next chunk
    s.abort("gone")
    assert s.caches.pool.free_count == 32 and s.idle
    s.check_integrity()


def test_flush_is_refused_while_busy_and_empties_the_caches_when_idle():
    s, t = make(pool=32, emb=4)
    s.add_request(t.request("a", [[1, 2, 3]]))
    batch, _ = s.next_batch()
    assert not s.flush()
    s.finish_batch(batch.batch_id)
    assert s.caches.radix.total_cached() > 0 and s.flush()
    assert s.caches.radix.total_cached() == 0 and s.caches.pool.free_count == 32
    s.add_request(t.request("b", [[1, 2, 3]]))
    [(again, _)] = run_all(s)
    assert not again.seqs[0].emb_hit and again.kv.prefix_lens == [0]


def test_ten_thousand_random_requests_under_a_small_pool_leak_nothing():
    rng = random.Random(3)
    s, t = make(pool=96, radix=True, chunk=24, emb=16, prefill=64, seqs=8)
    stems = [[rng.randint(1, 50) for _ in range(rng.randint(5, 40))] for _ in range(12)]
    live: list[str] = []
    for i in range(10_000):
        inputs = [
            rng.choice(stems)[: rng.randint(2, 40)] + [rng.randint(1, 9)] * rng.randint(0, 3)
            for _ in range(rng.randint(1, 3))
        ]
        rid = f"r{i}"
        s.add_request(t.request(rid, inputs))
        live.append(rid)
        if rng.random() < 0.05:
            s.abort(rng.choice(live))
        for _ in range(rng.randint(0, 2)):
            if (formed := s.next_batch()) is not None and rng.random() < 0.5:
                s.finish_batch(formed[0].batch_id, ok=rng.random() > 0.02)
        if rng.random() < 0.5 and s._in_flight:
            s.finish_batch(rng.choice(list(s._in_flight)))
        s.check_integrity()
    while not s.idle:
        for batch_id in list(s._in_flight):
            s.finish_batch(batch_id)
        s.next_batch()
    s.check_integrity()
    pool, radix = s.caches.pool, s.caches.radix
    assert pool.free_count + radix.evictable_size() == pool.total and radix.protected_size() == 0
