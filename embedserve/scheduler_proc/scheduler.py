"""Batch formation and request bookkeeping, with no sockets and no torch: testable on its own.

A request of N inputs becomes N sequences. Each batch takes waiting sequences in FCFS order up
to the token budget and the sequence budget; at most `max_batches_in_flight` batches are at
the executor at once, so the next batch is ready the moment the current one finishes.
A request's token block is released when its last sequence has been computed (or it was aborted
and nothing of it is still in flight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedserve.messages import ForwardBatch, RequestMeta, RingRef, SeqRef, TokenizedRequest
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
    seqs: list[Seq]
    tokens: int


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


@dataclass
class Scheduler:
    max_prefill_tokens: int
    max_running_seqs: int
    max_batches_in_flight: int = 2
    max_queued_tokens: int | None = None  # admission limit on waiting tokens; None = unbounded
    queue: FcfsQueue = field(default_factory=FcfsQueue)
    _requests: dict[str, _RequestState] = field(default_factory=dict)
    _in_flight: dict[int, _InFlight] = field(default_factory=dict)
    _pending_drops: list[str] = field(default_factory=list)
    _next_batch_id: int = 0

    @property
    def max_total_num_tokens(self) -> int:
        """Tokens the executor may hold at once: every batch in flight at its full budget."""
        return self.max_prefill_tokens * self.max_batches_in_flight

    @property
    def running_seqs(self) -> int:
        return sum(len(b.seqs) for b in self._in_flight.values())

    @property
    def running_tokens(self) -> int:
        return sum(b.tokens for b in self._in_flight.values())

    @property
    def can_schedule(self) -> bool:
        return len(self.queue) > 0 and len(self._in_flight) < self.max_batches_in_flight

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
        start = 0
        for index, length in enumerate(lengths):
            self.queue.push(Seq(req.meta.rid, index, req.tokens, start, length, now))
            start += length

    def abort(self, rid: str) -> list[RingRef]:
        """Forget a request whose client left; returns token blocks that can be released now."""
        state = self._requests.get(rid)
        if state is None or state.aborted:
            return []
        state.aborted = True
        state.unfinished -= self.queue.remove_request(rid)
        if state.meta_sent:
            self._pending_drops.append(rid)
        return self._retire_if_done(rid, state)

    def next_batch(self, now: float = 0.0) -> tuple[ForwardBatch, BatchStats] | None:
        if not self.can_schedule:
            return None
        running_before = self.running_seqs
        seqs, tokens = self._take_from_queue()
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        self._in_flight[batch_id] = _InFlight(seqs, tokens)
        batch = ForwardBatch(batch_id=batch_id, seqs=[], new_requests=[], dropped=self.take_drops())
        for seq in seqs:
            state = self._requests[seq.rid]
            state.in_flight += 1
            if not state.meta_sent:
                state.meta_sent = True
                batch.new_requests.append(state.meta)
            batch.seqs.append(SeqRef(seq.rid, seq.index, seq.tokens, seq.start, seq.length))
        stats = BatchStats(
            new_seqs=len(seqs),
            new_tokens=tokens,
            cached_tokens=0,
            token_usage=self.running_tokens / self.max_total_num_tokens,
            running_seqs=running_before,
            queued_seqs=len(self.queue),
            queue_waits=[now - seq.enqueued_at for seq in seqs],
        )
        return batch, stats

    def _take_from_queue(self) -> tuple[list[Seq], int]:
        seqs: list[Seq] = []
        tokens = 0
        while (head := self.queue.peek()) is not None and len(seqs) < self.max_running_seqs:
            # NOTE: a sequence longer than the whole budget still runs, alone, rather than wait forever.
            if seqs and tokens + head.length > self.max_prefill_tokens:
                break
            seqs.append(self.queue.pop())
            tokens += head.length
        return seqs, tokens

    def finish_batch(self, batch_id: int) -> list[RingRef]:
        """The executor is done with a batch; returns token blocks no longer needed by anyone."""
        batch = self._in_flight.pop(batch_id, None)
        if batch is None:
            return []
        released: list[RingRef] = []
        for seq in batch.seqs:
            state = self._requests.get(seq.rid)
            if state is None:
                continue
            state.in_flight -= 1
            state.unfinished -= 1
            released += self._retire_if_done(seq.rid, state)
        return released

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
