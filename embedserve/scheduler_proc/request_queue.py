"""The waiting queue: sequences (one per input) in arrival order. Pure Python, no torch."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from embedserve.messages import RingRef


@dataclass(slots=True)
class Seq:
    rid: str
    index: int  # input position within its request
    tokens: RingRef  # the request's token block
    start: int  # first token of this input within the block
    length: int
    enqueued_at: float = 0.0  # time.monotonic() when queued, for the queue-wait metric
    # Chunked prefill: what earlier chunks of this input left behind while it waits for the next.
    done: int = 0  # tokens already computed into the KV pool
    cached: int = 0  # tokens answered from the prefix cache so far
    held_pages: list[int] = field(default_factory=list)  # its pages outside the radix tree
    locked_node: Any = None  # the radix node that keeps its computed prefix alive


class FcfsQueue:
    """First come, first served; aborting a request removes its waiting sequences at once."""

    def __init__(self) -> None:
        self._seqs: deque[Seq] = deque()
        self.waiting_tokens = 0

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self) -> Iterator[Seq]:
        return iter(self._seqs)

    def push(self, seq: Seq) -> None:
        self._seqs.append(seq)
        self.waiting_tokens += seq.length

    def peek(self) -> Seq | None:
        return self._seqs[0] if self._seqs else None

    def push_front(self, seq: Seq) -> None:
        """Back at the head: a chunked input keeps its place in line for its next chunk."""
        self._seqs.appendleft(seq)
        self.waiting_tokens += seq.length

    def pop(self) -> Seq:
        seq = self._seqs.popleft()
        self.waiting_tokens -= seq.length
        return seq

    def remove_request(self, rid: str) -> list[Seq]:
        """Drop every waiting sequence of `rid` and return them (they may hold cache pages)."""
        removed = [s for s in self._seqs if s.rid == rid]
        if removed:
            self._seqs = deque(s for s in self._seqs if s.rid != rid)
            self.waiting_tokens = sum(s.length for s in self._seqs)
        return removed

    def check_integrity(self) -> None:
        assert self.waiting_tokens == sum(s.length for s in self._seqs), "waiting token count drifted"
