"""embedserve/bench/one_at_a_time.py: the timing loop of the one-query benchmarks."""

from __future__ import annotations

import itertools
import time

from embedserve.bench.one_at_a_time import one_at_a_time

GAP_MS = 100


def test_times_each_call_after_its_gap_and_not_the_warmup():
    starts = []

    def call():
        starts.append(time.perf_counter())
        time.sleep(0.002)

    samples = one_at_a_time(call, 3, gap_ms=GAP_MS, warmup=2)
    assert len(starts) == 5 and len(samples) == 3
    assert all(2.0 <= ms < GAP_MS for ms in samples)  # the call's own 2 ms, not the gap before it
    assert all(b - a >= GAP_MS / 1e3 for a, b in itertools.pairwise(starts[2:]))
    assert starts[1] - starts[0] < GAP_MS / 1e3  # warm-up calls run back to back
