"""The executor's lanes (gpu_proc/lanes.py): two batches at once, results in arrival order, and the
batches that must wait for another do."""

from __future__ import annotations

import threading
import time

import pytest

from embedserve.gpu_proc.lanes import InOrderSender, Job, Lanes
from embedserve.messages import ForwardBatch, KvPlan, RingRef, SeqRef

WAIT_S = 10.0  # generous: only a broken lane makes a test wait this long


def batch(batch_id: int, *seqs: SeqRef, kv: bool = False) -> ForwardBatch:
    plan = KvPlan(prefix_lens=[0], prefix_slots=b"", new_slots=b"\0\0\0\0") if kv else None
    return ForwardBatch(batch_id=batch_id, seqs=list(seqs) or [seq()], kv=plan)


def seq(slot: int = -1, hit: bool = False, length: int = 1) -> SeqRef:
    return SeqRef("r", 0, RingRef(0, 4 * length), 0, 0 if hit else length, emb_slot=slot, emb_hit=hit)


def test_in_order_sender_holds_a_later_ticket_until_the_earlier_one_is_sent():
    sender, sent = InOrderSender(), []
    first, second, third = (sender.take_ticket() for _ in range(3))
    sender.complete(second, lambda: sent.append("second"))
    sender.complete(third, lambda: sent.append("third"))
    assert sent == [] and sender.held == 2
    sender.complete(first, lambda: sent.append("first"))
    assert sent == ["first", "second", "third"] and sender.held == 0


def test_two_lanes_run_two_batches_at_the_same_time():
    both_running = threading.Barrier(2, timeout=WAIT_S)  # broken unless two jobs are inside at once
    done = []
    lanes = Lanes(2, lambda job: (both_running.wait(), done.append(job.batch.batch_id)))
    jobs = [lanes.submit(batch(i), i) for i in range(2)]
    assert all(job.done.wait(WAIT_S) for job in jobs)
    assert sorted(done) == [0, 1] and not any(job.failed for job in jobs)
    assert not lanes.busy


def test_one_lane_runs_each_batch_in_the_callers_thread_in_order():
    inside, order = [], []

    def work(job: Job) -> None:
        inside.append(job)
        assert len(inside) == 1, "two batches ran at once on one lane"
        order.append(job.batch.batch_id)
        assert threading.current_thread() is threading.main_thread()
        time.sleep(0.01)
        inside.remove(job)

    lanes = Lanes(1, work)
    jobs = [lanes.submit(batch(i), i) for i in range(4)]
    assert all(job.done.wait(WAIT_S) for job in jobs)
    assert order == [0, 1, 2, 3] and not any(job.failed for job in jobs)


def test_a_kv_batch_runs_alone():
    release_first = threading.Event()
    started = []

    def work(job: Job) -> None:
        started.append(job.batch.batch_id)
        if job.batch.batch_id == 0:
            release_first.wait(WAIT_S)

    lanes = Lanes(2, work)
    first = lanes.submit(batch(0), 0)
    kv = lanes.submit(batch(1, kv=True), 1)
    after = lanes.submit(batch(2), 2)
    time.sleep(0.1)
    assert started == [0]  # the KV batch waits for batch 0; batch 2 waits for the KV batch
    release_first.set()
    assert all(job.done.wait(WAIT_S) for job in (first, kv, after))
    assert started == [0, 1, 2]


def test_a_cache_hit_waits_for_the_batch_that_writes_its_slot():
    release_writer = threading.Event()
    read_at = {}

    def work(job: Job) -> None:
        if job.batch.batch_id == 0:
            release_writer.wait(WAIT_S)
            return
        job.wait_for_reads()
        read_at[job.batch.batch_id] = time.monotonic()

    lanes = Lanes(3, work)  # NOTE: three, so the third batch has a lane while two wait
    writer = lanes.submit(batch(0, seq(slot=7)), 0)
    reader = lanes.submit(batch(1, seq(slot=7, hit=True)), 1)
    other = lanes.submit(batch(2, seq(slot=8, hit=True)), 2)  # a slot nobody in flight writes
    assert reader.read_after == [writer] and other.read_after == []
    assert other.done.wait(WAIT_S)  # did not wait for the writer
    assert not reader.done.is_set()
    release_writer.set()
    assert reader.done.wait(WAIT_S) and not reader.failed


def test_a_hit_on_a_slot_whose_writer_failed_fails_instead_of_reading_garbage():
    reader_submitted = threading.Event()

    def work(job: Job) -> None:
        if job.batch.batch_id == 0:
            reader_submitted.wait(WAIT_S)
            raise RuntimeError("forward failed")
        job.wait_for_reads()

    lanes = Lanes(2, work)
    writer = lanes.submit(batch(0, seq(slot=3)), 0)
    reader = lanes.submit(batch(1, seq(slot=3, hit=True)), 1)
    reader_submitted.set()
    assert reader.read_after == [writer]
    assert reader.done.wait(WAIT_S)
    assert writer.failed and reader.failed  # the lane survived both and went on


def test_only_a_full_batch_runs_beside_another_and_a_small_one_waits_for_lane_0():
    release_first = threading.Event()
    started: dict[int, str] = {}

    def work(job: Job) -> None:
        started[job.batch.batch_id] = threading.current_thread().name
        if job.batch.batch_id == 0:
            release_first.wait(WAIT_S)

    lanes = Lanes(2, work, beside_min_tokens=100)
    first = lanes.submit(batch(0, seq(length=50)), 0)
    small = lanes.submit(batch(1, seq(length=60)), 1)
    full = lanes.submit(batch(2, seq(length=40), seq(length=60)), 2)
    hits = lanes.submit(batch(3, seq(slot=5, hit=True)), 3)  # computes nothing
    assert full.done.wait(WAIT_S) and hits.done.wait(WAIT_S)
    assert not small.done.is_set()  # behind the first, though lane 1 was free
    release_first.set()
    assert small.done.wait(WAIT_S) and first.done.wait(WAIT_S)
    assert started == {0: "lane-0", 1: "lane-0", 2: "lane-1", 3: "lane-1"}


def test_at_least_one_lane():
    with pytest.raises(ValueError):
        Lanes(0, lambda job: None)
