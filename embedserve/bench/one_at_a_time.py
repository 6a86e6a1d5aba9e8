"""Latency of one call at a time, each after a pause: a user's query now and then, not a load."""

from __future__ import annotations

import time
from collections.abc import Callable

# A short retrieval query (10 tokens with MiniLM's [CLS] and [SEP]).
SHORT_QUERY = "how do I reset my router password"


def one_at_a_time(
    call: Callable[[], object], count: int, gap_ms: float = 0.0, warmup: int = 0
) -> list[float]:
    """Milliseconds of each of `count` calls, one after another, each after a `gap_ms` sleep;
    `warmup` untimed calls first, without the gaps."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(count):
        time.sleep(gap_ms / 1e3)
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e3)
    return samples
