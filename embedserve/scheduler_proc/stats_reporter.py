"""Collects what the scheduler observes and reports it to the HTTP process, which alone owns Prometheus."""

from __future__ import annotations

import time

from embedserve.messages import SchedulerStats
from embedserve.scheduler_proc.scheduler import BatchStats, Scheduler

REPORT_INTERVAL = 0.05  # seconds; the newest state always goes out, at most this often


class StatsReporter:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._pending = self._empty()
        self._dirty = True  # the first report makes /metrics complete before any request
        self._last_sent = 0.0

    def _empty(self) -> SchedulerStats:
        return SchedulerStats(0, 0, 0, 0, 0, [], [], [], [], [])

    def on_batch(self, stats: BatchStats) -> None:
        # NOTE: a batch of whole-input cache hits computes nothing: counted as a forward batch, it
        # dragged the batch-size and forward-time panels to 0 under a repetitive load.
        if stats.new_tokens:
            self._pending.batch_seqs.append(stats.new_seqs)
            self._pending.batch_tokens.append(stats.new_tokens)
        self._pending.queue_wait_seconds.extend(stats.queue_waits)
        self._dirty = True

    def on_tokenized(self, seconds: float) -> None:
        self._pending.tokenize_seconds.append(seconds)
        self._dirty = True

    def on_forward(self, seconds: float) -> None:
        self._pending.forward_seconds.append(seconds)
        self._dirty = True

    def mark_changed(self) -> None:
        self._dirty = True

    def wait_ms(self, now: float | None = None) -> int | None:
        """How long the loop may block before a report is due; None when nothing is pending."""
        if not self._dirty:
            return None
        now = time.monotonic() if now is None else now
        return max(0, int((self._last_sent + REPORT_INTERVAL - now) * 1000))

    def take_report(self, now: float | None = None) -> SchedulerStats | None:
        now = time.monotonic() if now is None else now
        if not self._dirty or now - self._last_sent < REPORT_INTERVAL:
            return None
        s = self.scheduler
        report, self._pending = self._pending, self._empty()
        report.waiting_seqs, report.waiting_tokens = len(s.queue), s.queue.waiting_tokens
        report.running_seqs, report.running_tokens = s.running_seqs, s.running_tokens
        report.max_total_tokens = s.max_total_num_tokens
        self._dirty, self._last_sent = False, now
        return report
