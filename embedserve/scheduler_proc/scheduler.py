"""Batch formation and request bookkeeping, with no sockets and no torch: testable on its own.

A request of N inputs becomes N sequences. Each batch takes waiting sequences in FCFS order up
to the token budget (new tokens only: cached ones cost nothing) and the sequence budget; at most
`max_batches_in_flight` batches are at the executor at once, so the next batch is ready the
moment the current one finishes. A sequence that cannot get KV slots waits at the head: order is
kept and nothing fails for lack of cache. A long input runs chunk by chunk, back at the head of
the queue between chunks. A health probe (`/health_generate`) goes to the head of the queue on
arrival. A request's token block is released when its last sequence has been
computed (or it was aborted and nothing of it is still in flight).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from embedserve.messages import ForwardBatch, KvPlan, RequestMeta, RingRef, TokenizedRequest
from embedserve.scheduler_proc.cache_planner import CacheConfig, CachePlanner, Planned
from embedserve.scheduler_proc.request_queue import FcfsQueue, Seq


@dataclass
class _RequestState:
    meta: RequestMeta
    tokens: RingRef
    unfinished: int  # sequences queued or in flight
    in_flight: int = 0
    meta_sent: bool = False  # the output process has this request's meta
    aborted: bool = False


@dataclass
class _InFlight:
    planned: list[Planned]
    tokens: int  # tokens computed by this batch


@dataclass
class BatchStats:
    """What the per-batch log line and the metrics report about one scheduled batch."""

    new_seqs: int
    new_tokens: int
    cached_tokens: int
    token_usage: float
    running_seqs: int
    queued_seqs: int
    queue_waits: list[float] = field(default_factory=list)  # seconds each input waited in the queue


def _no_tokens(seq: Seq) -> Sequence[int]:
    raise RuntimeError("caches are on but the scheduler was given no way to read token ids")


class Scheduler:
    def __init__(
        self,
        max_prefill_tokens: int,
        max_running_seqs: int,
        max_batches_in_flight: int = 2,
        max_queued_tokens: int | None = None,
        min_overlap_tokens: int = 0,
        caches: CacheConfig | None = None,
        read_tokens: Callable[[Seq], Sequence[int]] = _no_tokens,
    ):
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running_seqs = max_running_seqs
        self.max_batches_in_flight = max_batches_in_flight
        self.max_queued_tokens = max_queued_tokens  # admission limit on waiting tokens; None = unbounded
        # a batch formed while another is still at the executor must carry at least this many tokens
        self.min_overlap_tokens = min_overlap_tokens
        self.caches = CachePlanner(caches or CacheConfig(), read_tokens)
        self.queue = FcfsQueue()
        self._requests: dict[str, _RequestState] = {}
        self._in_flight: dict[int, _InFlight] = {}
        self._pending_drops: list[str] = []
        self._next_batch_id = 0

    @property
    def max_total_num_tokens(self) -> int:
        """The KV pool's size, or (no pool) the tokens of every batch in flight at full budget."""
        if self.caches.pool is not None:
            return self.caches.pool.total
        return self.max_prefill_tokens * self.max_batches_in_flight

    @property
    def running_seqs(self) -> int:
        return sum(len(b.planned) for b in self._in_flight.values())

    @property
    def running_tokens(self) -> int:
        if self.caches.pool is not None:
            return self.caches.used_tokens()
        return sum(b.tokens for b in self._in_flight.values())

    @property
    def can_schedule(self) -> bool:
        if len(self.queue) == 0 or len(self._in_flight) >= self.max_batches_in_flight:
            return False
        # NOTE: with a batch already running, one or two inputs that just arrived would make a batch
        # of their own: on the CPU such a forward costs milliseconds of fixed overhead for a few
        # tokens (measured at 16 clients x 1 input: batches of 9, 5, 2 inputs in turn). They wait
        # for more company or for the executor to run dry, whichever comes first.
        return not self._in_flight or self.queue.waiting_tokens >= self.min_overlap_tokens

    @property
    def idle(self) -> bool:
        return not self._requests and not self._in_flight

    def admits(self, tokens: int) -> bool:
        """Whether a request of `tokens` fits under the waiting-token limit (an empty queue takes anything)."""
        if self.max_queued_tokens is None or not len(self.queue):
            return True
        return self.queue.waiting_tokens + tokens <= self.max_queued_tokens

    def add_request(self, req: TokenizedRequest, now: float = 0.0) -> None:
        lengths = req.meta.lengths
        self._requests[req.meta.rid] = _RequestState(req.meta, req.tokens, unfinished=len(lengths))
        seqs, start = [], 0
        for index, length in enumerate(lengths):
            seqs.append(Seq(req.meta.rid, index, req.tokens, start, length, now))
            start += length
        if req.meta.probe:  # NOTE: a health probe measures the pipeline, not the queue in front of it
            for seq in reversed(seqs):
                self.queue.push_front(seq)
        else:
            for seq in seqs:
                self.queue.push(seq)

    def abort(self, rid: str) -> list[RingRef]:
        """Forget a request whose client left; returns token blocks that can be released now."""
        state = self._requests.get(rid)
        if state is None or state.aborted:
            return []
        state.aborted = True
        removed = self.queue.remove_request(rid)
        for seq in removed:
            self.caches.release_seq(seq)
        state.unfinished -= len(removed)
        if state.meta_sent:
            self._pending_drops.append(rid)
        return self._retire_if_done(rid, state)

    def next_batch(self, now: float = 0.0) -> tuple[ForwardBatch, BatchStats] | None:
        if not self.can_schedule:
            return None
        running_before = self.running_seqs
        planned = self._take_from_queue()
        if not planned:
            return None  # the head waits for KV slots held by batches in flight
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        computed = sum(p.ref.length for p in planned)
        self._in_flight[batch_id] = _InFlight(planned, computed)
        batch = ForwardBatch(
            batch_id=batch_id,
            seqs=[p.ref for p in planned],
            new_requests=[],
            dropped=self.take_drops(),
            kv=_kv_plan(planned),
        )
        for plan in planned:
            state = self._requests[plan.seq.rid]
            state.in_flight += 1
            if not state.meta_sent:
                state.meta_sent = True
                batch.new_requests.append(state.meta)
        stats = BatchStats(
            new_seqs=len(planned),
            new_tokens=computed,
            cached_tokens=sum(p.ref.cached for p in planned if p.ref.final),
            token_usage=self.running_tokens / self.max_total_num_tokens,
            running_seqs=running_before,
            queued_seqs=len(self.queue),
            queue_waits=[  # NOTE: a health probe skips the queue: its ~0 s would flatter the metric
                now - p.seq.enqueued_at for p in planned if not self._requests[p.seq.rid].meta.probe
            ],
        )
        return batch, stats

    def _take_from_queue(self) -> list[Planned]:
        planned: list[Planned] = []
        budget = self.max_prefill_tokens
        while (head := self.queue.peek()) is not None and len(planned) < self.max_running_seqs:
            # NOTE: the first input of a batch has no budget: one longer than the budget still runs.
            plan = self.caches.plan(head, budget if planned else None)
            if plan is None:
                break
            self.queue.pop()
            planned.append(plan)
            budget -= plan.ref.length
            if budget <= 0:
                break
        return planned

    def computed_tokens(self, batch_id: int) -> int:
        """Tokens the model computes for a batch in flight (0: cache hits only, or unknown)."""
        batch = self._in_flight.get(batch_id)
        return batch.tokens if batch is not None else 0

    def finish_batch(self, batch_id: int, ok: bool = True) -> list[RingRef]:
        """The executor is done with a batch; returns token blocks no longer needed by anyone."""
        batch = self._in_flight.pop(batch_id, None)
        if batch is None:
            return []
        released: list[RingRef] = []
        for plan in batch.planned:
            state = self._requests.get(plan.seq.rid)
            keep_going = ok and not plan.ref.final and state is not None and not state.aborted
            self.caches.finish(plan, ok, keep_going)
            if state is None:
                continue
            state.in_flight -= 1
            if keep_going:
                self.queue.push_front(plan.seq)  # its next chunk goes first
                continue
            state.unfinished -= 1
            released += self._retire_if_done(plan.seq.rid, state)
        return released

    def flush(self) -> bool:
        """Drop every cached prefix and embedding; refused (False) unless nothing is queued or running."""
        if not self.idle:
            return False
        self.caches.flush()
        return True

    def take_drops(self) -> list[str]:
        """Rids the output process must forget; they ride on the next message to the executor."""
        drops, self._pending_drops = self._pending_drops, []
        return drops

    def _retire_if_done(self, rid: str, state: _RequestState) -> list[RingRef]:
        if state.unfinished > 0 and not (state.aborted and state.in_flight == 0):
            return []
        del self._requests[rid]
        return [state.tokens]

    def check_integrity(self) -> None:
        self.queue.check_integrity()
        in_flight = sum(s.in_flight for s in self._requests.values())
        assert in_flight <= self.running_seqs, "a request counts more in-flight sequences than batches hold"
        for rid, state in self._requests.items():
            assert state.unfinished >= state.in_flight >= 0, f"request {rid} counts drifted"
        # NOTE: without a radix tree, a chunked input's earlier pages are held by it, not cached.
        keeps_prefix = self.caches.radix is None
        held = [
            page
            for b in self._in_flight.values()
            for plan in b.planned
            for page in plan.new_pages + (plan.prefix_pages if keeps_prefix else [])
        ]
        held += [page for seq in self.queue for page in seq.held_pages]
        self.caches.check_integrity(held)


def _kv_plan(planned: list[Planned]) -> KvPlan | None:
    computed = [p for p in planned if p.ref.length > 0]
    if not computed or not computed[0].uses_kv:
        return None
    return KvPlan(
        prefix_lens=[len(p.prefix_pages) for p in computed],
        prefix_slots=_int32_bytes(page for p in computed for page in p.prefix_pages),
        new_slots=_int32_bytes(page for p in computed for page in p.new_pages),
    )


def _int32_bytes(values: Iterable[int]) -> bytes:
    return array("i", values).tobytes()
