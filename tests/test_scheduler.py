"""The scheduler without a model: budgets, FCFS order, abort, and token blocks released exactly once."""

from __future__ import annotations

import random

from embedserve.messages import RequestMeta, RingRef, TokenizedRequest
from embedserve.scheduler_proc.scheduler import Scheduler


def request(rid: str, lengths: list[int], offset: int = 0) -> TokenizedRequest:
    meta = RequestMeta(rid=rid, api="openai", model="m", lengths=lengths)
    return TokenizedRequest(meta=meta, tokens=RingRef(offset, 4 * sum(lengths)))


def test_batches_respect_token_and_sequence_budgets_in_fcfs_order():
    s = Scheduler(max_prefill_tokens=100, max_running_seqs=3, max_batches_in_flight=10)
    s.add_request(request("a", [40, 40]))
    s.add_request(request("b", [30, 10, 10]))
    first, stats = s.next_batch()
    assert [(q.rid, q.index) for q in first.seqs] == [("a", 0), ("a", 1)]  # a 30-token third would pass 100
    assert stats.new_tokens == 80 and stats.queued_seqs == 3
    second, _ = s.next_batch()
    assert [(q.rid, q.index) for q in second.seqs] == [("b", 0), ("b", 1), ("b", 2)]
    assert [q.start for q in second.seqs] == [0, 30, 40]
    assert s.next_batch() is None


def test_a_health_probe_goes_ahead_of_the_waiting_queue():
    s = Scheduler(max_prefill_tokens=100, max_running_seqs=8)
    s.add_request(request("a", [60, 60]))
    probe = TokenizedRequest(
        meta=RequestMeta(rid="p", api="encode", model="", lengths=[3], probe=True), tokens=RingRef(480, 12)
    )
    s.add_request(probe)
    first, _ = s.next_batch()
    assert [(q.rid, q.index) for q in first.seqs] == [("p", 0), ("a", 0)]


def test_an_input_longer_than_the_budget_runs_alone():
    s = Scheduler(max_prefill_tokens=16, max_running_seqs=8)
    s.add_request(request("long", [50, 5]))
    batch, _ = s.next_batch()
    assert [q.length for q in batch.seqs] == [50]


def test_at_most_two_batches_in_flight_and_meta_sent_once():
    s = Scheduler(max_prefill_tokens=10, max_running_seqs=8)
    s.add_request(request("r", [10, 10, 10]))
    b0, _ = s.next_batch()
    b1, _ = s.next_batch()
    assert s.next_batch() is None  # the executor already holds two
    assert [m.rid for m in b0.new_requests] == ["r"] and b1.new_requests == []
    assert s.finish_batch(b0.batch_id) == []
    b2, _ = s.next_batch()
    assert s.finish_batch(b1.batch_id) == []
    assert s.finish_batch(b2.batch_id) == [RingRef(0, 120)]  # the last input releases the block
    assert s.idle


def test_a_second_batch_waits_for_enough_tokens_while_one_runs():
    s = Scheduler(max_prefill_tokens=100, max_running_seqs=8, min_overlap_tokens=30)
    s.add_request(request("a", [10]))
    first, _ = s.next_batch()  # nothing running: even a small batch goes at once
    assert [q.rid for q in first.seqs] == ["a"]
    s.add_request(request("b", [12], offset=100))
    assert not s.can_schedule and s.next_batch() is None  # 12 tokens would be a batch of their own
    s.add_request(request("c", [20], offset=200))
    second, _ = s.next_batch()  # 32 waiting: worth a forward while the first runs
    assert [q.rid for q in second.seqs] == ["b", "c"]
    s.add_request(request("d", [5], offset=300))
    assert s.next_batch() is None  # two in flight
    s.finish_batch(first.batch_id)
    assert s.next_batch() is None  # one running, 5 tokens waiting
    s.finish_batch(second.batch_id)
    third, _ = s.next_batch()  # the executor ran dry: whatever waits goes
    assert [q.rid for q in third.seqs] == ["d"]


def test_abort_of_a_waiting_request_releases_its_block_at_once():
    s = Scheduler(max_prefill_tokens=10, max_running_seqs=8)
    s.add_request(request("gone", [5, 5]))
    assert s.abort("gone") == [RingRef(0, 40)]
    assert s.next_batch() is None and s.idle and s.take_drops() == []  # output never saw it


def test_abort_while_in_flight_waits_for_the_batch_and_tells_the_output():
    s = Scheduler(max_prefill_tokens=5, max_running_seqs=8)
    s.add_request(request("gone", [5, 5, 5]))
    batch, _ = s.next_batch()
    assert s.abort("gone") == []  # one input is at the executor: its tokens are still read
    assert s.take_drops() == ["gone"]
    assert s.finish_batch(batch.batch_id) == [RingRef(0, 60)]
    assert s.idle and s.next_batch() is None


def test_random_traffic_releases_every_block_exactly_once():
    rng = random.Random(0)
    s = Scheduler(max_prefill_tokens=64, max_running_seqs=6)
    released: list[int] = []
    submitted = []
    for step in range(3000):
        op = rng.random()
        if op < 0.3:
            rid = f"r{step}"
            s.add_request(request(rid, [rng.randint(1, 40) for _ in range(rng.randint(1, 5))], offset=step))
            submitted.append(step)
        elif op < 0.4 and submitted:
            released += [r.offset for r in s.abort(f"r{rng.choice(submitted)}")]
        elif op < 0.7:
            s.next_batch()
        elif s._in_flight:
            released += [r.offset for r in s.finish_batch(rng.choice(list(s._in_flight)))]
        s.check_integrity()
    while not s.idle:
        s.next_batch()
        for batch_id in list(s._in_flight):
            released += [r.offset for r in s.finish_batch(batch_id)]
    assert sorted(released) == sorted(submitted)
