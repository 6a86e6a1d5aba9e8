"""The scheduler process: receives tokenized requests, sends batches to the executor, logs each batch."""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection

import numpy as np
import zmq

from embedserve.ipc.child import child_process
from embedserve.ipc.ports import PortArgs
from embedserve.ipc.shm_ring import ShmRing
from embedserve.ipc.zmq_queue import ZmqPull, ZmqPush
from embedserve.messages import (
    AbortRequest,
    BatchDone,
    DropRequests,
    ExecutorInput,
    FlushCache,
    FlushDone,
    HttpInput,
    RequestFailed,
    RingRef,
    SchedulerInput,
    TokenizedRequest,
)
from embedserve.model_config import model_config_from_args
from embedserve.scheduler_proc.cache_planner import CacheConfig
from embedserve.scheduler_proc.request_queue import Seq
from embedserve.scheduler_proc.scheduler import BatchStats, Scheduler
from embedserve.scheduler_proc.stats_reporter import StatsReporter
from embedserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# How long a cache flush waits for nothing to be queued or running before it is refused.
FLUSH_WAIT_S = 2.0


def format_batch_log(stats: BatchStats) -> str:
    """The seed's per-batch line, which users grep for."""
    return (
        f"Prefill batch. #new-seq: {stats.new_seqs}, #new-token: {stats.new_tokens}, "
        f"#cached-token: {stats.cached_tokens}, token usage: {stats.token_usage:.2f}, "
        f"#running-req: {stats.running_seqs}, #queue-req: {stats.queued_seqs}"
    )


class SchedulerWorker:
    def __init__(self, args: ServerArgs, ports: PortArgs, ctx: zmq.Context):
        self.token_ring = ShmRing.attach(ports.token_ring)
        self.scheduler = Scheduler(
            args.prefill_token_budget,
            args.running_request_budget,
            max_batches_in_flight=args.batches_in_flight,
            max_queued_tokens=args.max_queued_tokens,
            min_overlap_tokens=args.min_overlap_tokens,
            caches=cache_config(args),
            read_tokens=self._read_tokens,
        )
        self.inbox: ZmqPull[SchedulerInput] = ZmqPull(ctx, ports.scheduler_addr, SchedulerInput)
        self.to_executor: ZmqPush[ExecutorInput] = ZmqPush(ctx, ports.executor_addr)
        self.to_http: ZmqPush[HttpInput] = ZmqPush(ctx, ports.http_addr)
        self.stats = StatsReporter(self.scheduler)
        self._handlers = {
            TokenizedRequest: self._on_request,
            AbortRequest: self._on_abort,
            BatchDone: self._on_batch_done,
            FlushCache: self._on_flush,
        }
        self._flushes: list[tuple[FlushCache, float]] = []  # waiting for an idle moment, until a deadline

    def run_forever(self) -> None:
        while True:
            first = self.inbox.recv(timeout_ms=self._wait_ms())
            for msg in ([first] if first is not None else []) + self.inbox.drain():
                self._handlers[type(msg)](msg)
                self.stats.mark_changed()
            self._schedule()
            self._answer_flushes()
            if (report := self.stats.take_report()) is not None:
                self.to_http.send(report)

    def _wait_ms(self) -> int | None:
        # NOTE: block only when there is nothing to schedule and no report due.
        if self.scheduler.can_schedule:
            return 0
        waits = [w for w in (self.stats.wait_ms(), self._flush_wait_ms()) if w is not None]
        return min(waits) if waits else None

    def _flush_wait_ms(self) -> int | None:
        if not self._flushes:
            return None
        return max(0, int((min(deadline for _, deadline in self._flushes) - time.monotonic()) * 1000) + 1)

    def _schedule(self) -> None:
        while (formed := self.scheduler.next_batch(time.monotonic())) is not None:
            batch, stats = formed
            # NOTE: the batch goes first: formatting and writing the log line took ~0.1 ms that the
            # executor waited for on every batch.
            self.to_executor.send(batch)
            logger.info(format_batch_log(stats))
            self.stats.on_batch(stats)
        if drops := self.scheduler.take_drops():
            self.to_executor.send(DropRequests(rids=drops))

    def _on_request(self, msg: TokenizedRequest) -> None:
        tokens = sum(msg.meta.lengths)
        if not msg.meta.probe and not self.scheduler.admits(tokens):
            self._release([msg.tokens])
            self.to_http.send(
                RequestFailed(
                    rid=msg.meta.rid,
                    status=429,
                    type="rate_limit_error",
                    code="queue_full",
                    message=f"The server is at capacity: {self.scheduler.queue.waiting_tokens} tokens are waiting "
                    f"(--max-queued-tokens {self.scheduler.max_queued_tokens}). Retry shortly.",
                )
            )
            return
        self.scheduler.add_request(msg, time.monotonic())
        if not msg.meta.probe:  # NOTE: health probes stay out of the latency metrics
            self.stats.on_tokenized(msg.tokenize_seconds)

    def _on_abort(self, msg: AbortRequest) -> None:
        self._release(self.scheduler.abort(msg.rid))

    def _on_flush(self, msg: FlushCache) -> None:
        # NOTE: not at once: a request whose answer the client already has may still be in flight
        # here ("done" comes from the executor on another path than the answer), as may a health probe
        self._flushes.append((msg, time.monotonic() + FLUSH_WAIT_S))

    def _answer_flushes(self) -> None:
        """Flushes once nothing is queued or running; refuses those that waited FLUSH_WAIT_S for it."""
        if not self._flushes:
            return
        if self.scheduler.flush():
            logger.info("Cache flushed.")
            answered, self._flushes = self._flushes, []
            for msg, _ in answered:
                self.to_http.send(FlushDone(flush_id=msg.flush_id, ok=True, message=""))
            return
        now, still_waiting = time.monotonic(), []
        for msg, deadline in self._flushes:
            if deadline > now:
                still_waiting.append((msg, deadline))
            else:
                message = "Cannot flush the cache while requests are in flight."
                self.to_http.send(FlushDone(flush_id=msg.flush_id, ok=False, message=message))
        self._flushes = still_waiting

    def _read_tokens(self, seq: Seq) -> list[int]:
        block = np.frombuffer(self.token_ring.view(seq.tokens.offset, seq.tokens.nbytes), dtype="<i4")
        return block[seq.start : seq.start + seq.length].tolist()

    def _on_batch_done(self, msg: BatchDone) -> None:
        if self.scheduler.computed_tokens(msg.batch_id):  # NOTE: see StatsReporter.on_batch
            self.stats.on_forward(msg.forward_seconds)
        self._release(self.scheduler.finish_batch(msg.batch_id, ok=not msg.failed_rids))
        for rid in msg.failed_rids:  # already answered with a 500: computing the rest would be waste
            self._release(self.scheduler.abort(rid))

    def _release(self, blocks: list[RingRef]) -> None:
        for ref in blocks:
            self.token_ring.release(ref.offset)


def cache_config(args: ServerArgs) -> CacheConfig:
    """The launcher sets max_total_tokens to the KV pool the executor allocated (0: none)."""
    pool = args.max_total_tokens or 0
    return CacheConfig(
        kv_pool_tokens=pool,
        radix=pool > 0 and not args.disable_radix_cache,
        chunk_size=min(args.chunk_size, pool) if pool else 0,
        embedding_cache_size=args.embedding_cache_size,
    )


def run_scheduler_process(args: ServerArgs, ports: PortArgs, conn: Connection) -> None:
    with child_process("scheduler", args.log_level, conn) as launcher:
        worker = SchedulerWorker(args, ports, zmq.Context())
        s = worker.scheduler
        context_len = model_config_from_args(args).context_length
        chunk = f"chunked_prefill_size={s.caches.config.chunk_size}, " if s.caches.config.chunk_size else ""
        logger.info(
            f"max_total_num_tokens={s.max_total_num_tokens}, {chunk}max_prefill_tokens={s.max_prefill_tokens}, "
            f"max_running_requests={s.max_running_seqs}, context_len={context_len}"
        )
        launcher.ready()
        worker.run_forever()
