"""How many CPU threads one batch runs on: all of the executor's, or one for a small batch after a pause.

Measured on 2 Zen 4 vCPUs, all-MiniLM-L6-v2 fp32, one 10-token query, by the pause before it: up to
10 ms, two threads take 4.7-6.2 ms and one 6.0-7.2; from ~20 ms the two cross, and after 50 ms two
threads take 26-33 ms against one's 7-9. Every parallel region of the forward (a GEMM, a LayerNorm)
then waits ~0.5 ms for the second OpenMP thread, whose vCPU the hypervisor has descheduled, and a
small batch's regions are far shorter than that wait. From ~64 MiniLM tokens on, each region holds
enough work that two threads win after any pause (64 tokens: 17 vs 20 ms after 50 ms idle).

The rule is in work per layer, not tokens, so it carries to other models: a 10-token query to a
1.5B-parameter model holds ~25x MiniLM's 64-token work per layer and keeps every thread.

When the executor runs two batches at once (`gpu_proc/lanes.py`), `CoreShare` splits the threads
between them, and hands a batch running alone all of them again, layer by layer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# A batch below this many multiply-adds x 2 per layer (linear layers only) is small: 45 tokens of
# MiniLM (3.5 MFLOP per token per layer).
SERIAL_LAYER_FLOPS = 1.6e8
# A small batch keeps every thread while the previous forward ended at most this long ago.
WARM_GAP_S = 0.010


def batch_threads(num_tokens: int, flops_per_token_per_layer: float, max_threads: int, idle_s: float) -> int:
    """Threads for a batch of `num_tokens` that follows `idle_s` seconds without a forward:
    one for a small batch after a pause, all of them otherwise."""
    if num_tokens * flops_per_token_per_layer < SERIAL_LAYER_FLOPS and idle_s > WARM_GAP_S:
        return 1
    return max_threads


class CoreShare:
    """The executor's threads, split evenly between the batches that run at the same time.

    A batch enters with `running_batch(wanted)` (its own ceiling: `batch_threads`) and calls
    `rebalance()` before each layer: alone it takes up to every thread, beside another batch half of
    them. The count is torch's per calling thread (OpenMP's nthreads ICV), so two lanes each set
    their own; `enter_lane` bounds a lane other than the first for good.

    NOTE: only one thread of control may ever run OpenMP regions on several threads: each such
    thread gets its own libgomp worker pool. Measured (10-token forward, 2 vCPUs): in a second
    thread's pool 7.8-10.8 ms against 4.6-6.0 in the first's, and the first's +0.8-1.1 ms from then
    on. So lane 0 takes every thread, the others their share only, and the model is built with one
    thread outside the lanes.
    """

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self._running = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def enter_lane(self, lane: int, lanes: int) -> None:
        """In lane `lane`'s thread (of `lanes`): lane 0 may take every thread, the others, for good,
        only their share."""
        if lane > 0:
            self._local.cap = max(1, self.max_threads // lanes)

    @property
    def running(self) -> int:
        return self._running

    @contextmanager
    def running_batch(self, wanted: int) -> Iterator[None]:
        with self._lock:
            self._running += 1
        self._local.wanted = wanted
        before = torch.get_num_threads()
        try:
            self.rebalance()
            yield
        finally:
            with self._lock:
                self._running -= 1
            self._local.wanted = None
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def rebalance(self) -> None:
        """Sets this thread's count to its share now; outside `running_batch` it does nothing."""
        wanted = getattr(self._local, "wanted", None)
        if wanted is None:
            return
        cap = getattr(self._local, "cap", self.max_threads)
        share = min(wanted, cap, max(1, self.max_threads // max(1, self._running)))
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
