"""The waiting queue: sequences (one per input) in arrival order. Pure Python, no torch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from embedserve.messages import RingRef


@dataclass(slots=True)
class Seq:
    rid: str
    index: int  # input position within its request
    tokens: RingRef  # the request's token block
    start: int  # first token of this input within the block
    length: int
    enqueued_at: float = 0.0  # time.monotonic() when queued, for the queue-wait metric


class FcfsQueue:
    """First come, first served; aborting a request removes its waiting sequences at once."""

    def __init__(self) -> None:
        self._seqs: deque[Seq] = deque()
        self.waiting_tokens = 0

    def __len__(self) -> int:
        return len(self._seqs)

    def push(self, seq: Seq) -> None:
        self._seqs.append(seq)
        self.waiting_tokens += seq.length

    def peek(self) -> Seq | None:
        return self._seqs[0] if self._seqs else None

    def pop(self) -> Seq:
        seq = self._seqs.popleft()
        self.waiting_tokens -= seq.length
        return seq

    def remove_request(self, rid: str) -> int:
        """Drop every waiting sequence of `rid`; returns how many there were."""
        kept = deque(s for s in self._seqs if s.rid != rid)
        removed = len(self._seqs) - len(kept)
        if removed:
            self._seqs = kept
            self.waiting_tokens = sum(s.length for s in kept)
        return removed

    def check_integrity(self) -> None:
        assert self.waiting_tokens == sum(s.length for s in self._seqs), "waiting token count drifted"
