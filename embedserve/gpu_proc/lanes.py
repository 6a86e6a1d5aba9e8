"""Batches run on `count` threads at once ("lanes"); what they produce leaves in the order they came.

Why, on the CPU: one batch on two OpenMP threads stalls at every barrier while the other processes
(HTTP, tokenizer, output, the clients) hold one of its cores, because its partner thread waits for
the preempted one. Two batches, each on one thread, do not wait on each other. Measured on 2 Zen 4
vCPUs, all-MiniLM-L6-v2 fp32 in-process, 600-token batches: one batch at a time on two threads
6.2-6.6k tokens/s, two at a time on one thread each 6.9k; beside a process busy 2 ms of every 10
(20 % of a core in bursts, like the pipeline at 16 clients x 1 input) 5.5-5.8k against 6.9k. A batch
that runs alone still gets every thread (`cpu_threads.CoreShare`).

Only a batch of at least `beside_min_tokens` (or of cache hits only, which computes nothing) runs
beside another; a smaller one waits for lane 0. A partial batch means there is no backlog, and on
one core beside another it would outlive the batch it joined and leave the other core idle; full
batches (a backlog) keep both lanes busy.
Measured at 16 clients x 1 input (batches of ~600-1,200 tokens): a second lane taking any batch
lost up to 11 % tokens/s; taking only those of half the token budget or more, level with one lane,
while 16 x 8 keeps the gain.

Order: a request's metadata rides on the first batch that holds one of its inputs, so the output
process must see batches, and the drops between them, in the order the scheduler sent them; a
batch that finishes early waits in `InOrderSender` for the ones before it. Two batches may also
depend on each other: one reads an embedding-cache slot that an earlier one is still writing (it
waits for that batch before reading), and a batch that extends cached K/V runs alone (the
prefix-cache bookkeeping was written for batches that run one after the other).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from embedserve.messages import ForwardBatch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One batch on its way through a lane."""

    ticket: int  # its place in the output order
    batch: ForwardBatch
    start_after: list[Job] = field(default_factory=list)  # must finish before this one starts
    read_after: list[Job] = field(default_factory=list)  # write cache slots this one reads
    writes: set[int] = field(default_factory=set)  # embedding-cache slots this one fills
    done: threading.Event = field(default_factory=threading.Event)
    failed: bool = False

    def wait_for_reads(self) -> None:
        """Blocks until every batch writing a slot this one reads is done; raises if one failed."""
        for writer in self.read_after:
            writer.done.wait()
            if writer.failed:
                raise RuntimeError(
                    f"an input of this batch was being computed by batch {writer.batch.batch_id}, which failed"
                )


class InOrderSender:
    """Each ticket's send runs once every earlier ticket's has; sends never run two at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_ticket = 0
        self._next_send = 0
        self._ready: dict[int, Callable[[], None]] = {}

    def take_ticket(self) -> int:
        with self._lock:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            return ticket

    def complete(self, ticket: int, send: Callable[[], None]) -> None:
        with self._lock:
            self._ready[ticket] = send
            while (ready := self._ready.pop(self._next_send, None)) is not None:
                self._next_send += 1
                ready()

    @property
    def held(self) -> int:
        """Sends waiting for an earlier ticket."""
        with self._lock:
            return len(self._ready)


class Lanes:
    """`count` threads, each running `work(job)` for one submitted batch at a time.

    A batch goes to the first idle lane that may take it, so one request at a time always runs on
    lane 0, whose OpenMP pool is the only one with several threads (see `CoreShare`; batches handed
    to any free lane in turn made one query back to back 18 ms against 12-15). With one lane there
    is no thread: `submit` runs the batch in the caller's.
    """

    def __init__(
        self,
        count: int,
        work: Callable[[Job], None],
        on_start: Callable[[int], None] | None = None,
        beside_min_tokens: int = 0,
    ):
        """`on_start(n)` runs first in lane n's thread; lanes other than 0 take only batches of at
        least `beside_min_tokens` tokens."""
        if count < 1:
            raise ValueError(f"at least one lane, not {count}")
        self.count = count
        self.beside_min_tokens = beside_min_tokens
        self._work = work
        self._on_start = on_start
        self._inboxes: list[queue.SimpleQueue[Job]] = [queue.SimpleQueue() for _ in range(count)]
        self._lane_busy = [False] * count
        self._waiting: deque[Job] = deque()  # submitted while no idle lane could take them
        self._lock = threading.Lock()
        self._in_flight: list[Job] = []
        self._alone: Job | None = None  # the KV batch that runs by itself, while it is not done
        self._writer_of: dict[int, Job] = {}  # embedding-cache slot -> the batch filling it
        if count > 1:
            for n in range(count):
                threading.Thread(target=self._lane, args=(n,), name=f"lane-{n}", daemon=True).start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return any(not job.done.is_set() for job in self._in_flight)

    def submit(self, batch: ForwardBatch, ticket: int) -> Job:
        """Queues `batch`; call in the order the batches arrived (dependencies look backwards)."""
        job = Job(ticket, batch)
        with self._lock:
            self._in_flight = [j for j in self._in_flight if not j.done.is_set()]
            if batch.kv is not None:
                job.start_after = list(self._in_flight)
                self._alone = job
            elif self._alone is not None and not self._alone.done.is_set():
                job.start_after = [self._alone]
            for seq in batch.seqs:
                writer = self._writer_of.get(seq.emb_slot) if seq.emb_hit else None
                if writer is not None and not writer.done.is_set() and writer not in job.read_after:
                    job.read_after.append(writer)
            job.writes = {
                s.emb_slot
                for s in batch.seqs
                if s.final and s.emb_slot >= 0 and not s.emb_hit and s.length > 0
            }
            for slot in job.writes:
                self._writer_of[slot] = job
            self._in_flight.append(job)
            if self.count == 1:
                lane = None
            elif (lane := self._claim_idle_lane(job)) is None:
                self._waiting.append(job)
                return job
        if lane is None:  # NOTE: one lane is the caller's own thread
            self._run(job)
        else:
            self._inboxes[lane].put(job)
        return job

    def _may_run_on(self, lane: int, job: Job) -> bool:
        # NOTE: a batch of cache hits only computes nothing: it never keeps a core from another
        tokens = sum(s.length for s in job.batch.seqs)
        return lane == 0 or tokens == 0 or tokens >= self.beside_min_tokens

    def _claim_idle_lane(self, job: Job) -> int | None:
        lane = next(
            (n for n, busy in enumerate(self._lane_busy) if not busy and self._may_run_on(n, job)), None
        )
        if lane is not None:
            self._lane_busy[lane] = True
        return lane

    def _next_waiting(self, lane: int) -> Job | None:
        """The earliest waiting batch this lane may run, taken off the queue."""
        job = next((j for j in self._waiting if self._may_run_on(lane, j)), None)
        if job is not None:
            self._waiting.remove(job)
        return job

    def _lane(self, n: int) -> None:
        if self._on_start is not None:
            self._on_start(n)
        job: Job | None = None
        while True:
            if job is None:
                job = self._inboxes[n].get()
            self._run(job)
            with self._lock:
                job = self._next_waiting(n)
                self._lane_busy[n] = job is not None

    def _run(self, job: Job) -> None:
        for earlier in job.start_after:
            earlier.done.wait()
        try:
            self._work(job)
        except Exception:  # NOTE: `work` answers its own errors; this keeps the lane alive regardless
            logger.exception("Lane failed on batch %d", job.batch.batch_id)
            job.failed = True
        finally:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        with self._lock:
            for slot in job.writes:
                if self._writer_of.get(slot) is job:
                    del self._writer_of[slot]
        job.done.set()
