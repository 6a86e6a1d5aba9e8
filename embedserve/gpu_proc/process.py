"""The executor process: runs each batch through the model and hands embeddings to the output process.

A failing forward fails only its batch: every request in it gets a 500 with the error, and the
executor goes on serving. Embeddings leave through the embedding ring; the batch's rows travel
with the same message, so the output process sees metas, rows and drops in scheduling order.
On a CPU of two threads (or with `--concurrent-batches N`), full batches run two (N) at once, each
on its own thread (`lanes.py`); results still leave in that order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import zmq

from embedserve.gpu_proc.embedding_table import EmbeddingTable
from embedserve.gpu_proc.kv_pool_size import kv_pool_tokens
from embedserve.gpu_proc.lanes import InOrderSender, Job, Lanes
from embedserve.ipc.child import child_process
from embedserve.ipc.heap import HeapTrimmer
from embedserve.ipc.ports import PortArgs
from embedserve.ipc.shm_ring import ShmRing
from embedserve.ipc.zmq_queue import ZmqPull, ZmqPush
from embedserve.messages import (
    BatchDone,
    BatchEmbeddings,
    DetokenizerInput,
    DropRequests,
    ExecutorInput,
    ForwardBatch,
    KvPlan,
    RingRef,
    SchedulerInput,
    SeqRef,
)
from embedserve.model_config import model_config_from_args
from embedserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class ExecutorWorker:
    def __init__(self, args: ServerArgs, ports: PortArgs, ctx: zmq.Context):
        from embedserve.gpu_proc.model_runner import ModelRunner

        config = model_config_from_args(args)
        self.runner = ModelRunner(
            config,
            device=args.device,
            dtype=args.dtype,
            num_threads=args.executor_threads,
            attention_backend=args.attention_backend,
            # NOTE: with lanes, only they may run OpenMP on several threads (see CoreShare)
            build_threads=1 if args.executor_lanes > 1 else None,
        )
        if self.runner.supports_kv_cache and args.max_total_tokens != 0:
            self.runner.allocate_kv_pool(
                kv_pool_tokens(
                    args.max_total_tokens,
                    args.mem_fraction_static,
                    args.device,
                    self.runner.kv_bytes_per_token,
                )
            )
        self.embedding_table = EmbeddingTable(args.embedding_cache_size, self.runner.hidden_size)
        self.token_ring = ShmRing.attach(ports.token_ring)
        self.embedding_ring = ShmRing.attach(ports.embedding_ring)
        self.inbox: ZmqPull[ExecutorInput] = ZmqPull(ctx, ports.executor_addr, ExecutorInput)
        self.to_scheduler: ZmqPush[SchedulerInput] = ZmqPush(ctx, ports.scheduler_addr)
        self.to_output: ZmqPush[DetokenizerInput] = ZmqPush(ctx, ports.detokenizer_addr)
        self.trimmer = HeapTrimmer()
        self.in_order = InOrderSender()
        # NOTE: lanes send "done" from their own threads, and a ZMQ socket must not be used by two at once
        self._to_scheduler_lock = threading.Lock()
        lanes = args.executor_lanes
        self.lanes = Lanes(
            lanes,
            self.run_job,
            on_start=lambda n: self.runner.core_share.enter_lane(n, lanes),
            beside_min_tokens=args.lane_min_tokens,
        )
        if lanes > 1:
            logger.info(
                "Concurrent batches: %d, the threads split between them; a batch runs beside another from %d tokens.",
                lanes,
                args.lane_min_tokens,
            )
        # NOTE: a fault-injection hook for the tests of "a crash in the forward fails only its batch";
        # unset in production, where nothing else reads it.
        fail_token = os.environ.get("EMBEDSERVE_TEST_FAIL_TOKEN_ID")
        self._fail_token = int(fail_token) if fail_token else None

    def run_forever(self) -> None:
        while True:
            self.handle(self.trimmer.next_message(self.inbox, busy=lambda: self.lanes.busy))

    def handle(self, msg: ExecutorInput) -> None:
        ticket = self.in_order.take_ticket()
        if isinstance(msg, ForwardBatch):
            self.lanes.submit(msg, ticket)
        elif isinstance(msg, DropRequests):  # forwarded after every batch that came before it
            self.in_order.complete(ticket, lambda: self.to_output.send(msg))

    def run_job(self, job: Job) -> None:
        """In a lane thread: the forward, then the output (in order) and "done" to the scheduler."""
        batch = job.batch
        finals = [s for s in batch.seqs if s.final]  # an earlier chunk's row is not an embedding
        out = BatchEmbeddings(
            batch_id=batch.batch_id,
            rows=[(s.rid, s.index) for s in finals],
            row_cached=[s.cached for s in finals],
            embeddings=None,
            dim=self.runner.hidden_size,
            new_requests=batch.new_requests,
            dropped=batch.dropped,
        )
        started = time.perf_counter()
        try:
            out.embeddings = self._publish(self._embed(job, finals))
        except Exception as exc:
            logger.exception("Forward of batch %d failed", batch.batch_id)
            out.error = f"The model failed on this batch: {type(exc).__name__}: {exc}"
            job.failed = True
        forward_seconds = time.perf_counter() - started
        # NOTE: the output message goes first when it can; one held behind an earlier batch still
        # running does not hold back "done", which frees this lane for the scheduler's next batch.
        self.in_order.complete(job.ticket, lambda: self.to_output.send(out))
        failed = sorted({s.rid for s in batch.seqs}) if out.error else []
        with self._to_scheduler_lock:
            self.to_scheduler.send(
                BatchDone(batch_id=batch.batch_id, forward_seconds=forward_seconds, failed_rids=failed)
            )
        self.trimmer.after_work()  # after "done", so the scheduler is not kept waiting

    def _embed(self, job: Job, finals: list[SeqRef]) -> np.ndarray:
        """Rows of the batch's final inputs: computed, or read from the whole-input cache on a hit."""
        batch = job.batch
        computed = [s for s in batch.seqs if s.length > 0]
        by_seq: dict[int, np.ndarray] = {}
        if computed:
            tokens = self._gather_tokens(computed)
            if self._fail_token is not None and (tokens == self._fail_token).any():
                raise RuntimeError(f"injected fault on token {self._fail_token}")
            rows = self.runner.embed(tokens, [s.length for s in computed], _kv_batch(batch.kv))
            for seq, row in zip(computed, rows, strict=True):
                by_seq[id(seq)] = row
                if seq.final and seq.emb_slot >= 0:
                    self.embedding_table.store(seq.emb_slot, row)
        if not finals:  # only chunks before the last: nothing to hand on yet
            return np.empty((0, self.runner.hidden_size), dtype=np.float32)
        # NOTE: stored before read, so a hit on an input computed in this very batch finds its row;
        # one computed by a batch in another lane is read once that batch is done.
        job.wait_for_reads()
        return np.stack(
            [self.embedding_table.read(s.emb_slot) if s.emb_hit else by_seq[id(s)] for s in finals]
        )

    def _gather_tokens(self, seqs: list[SeqRef]) -> np.ndarray:
        parts = []
        for seq in seqs:
            block = np.frombuffer(self.token_ring.view(seq.tokens.offset, seq.tokens.nbytes), dtype="<i4")
            parts.append(block[seq.start : seq.start + seq.length])
        return np.concatenate(parts)  # a copy: the ring slot may be reused once the batch is done

    def _publish(self, embeddings: np.ndarray) -> RingRef:
        data = np.ascontiguousarray(embeddings, dtype="<f4")
        handle, view = self.embedding_ring.reserve(data.nbytes)
        np.frombuffer(view, dtype="<f4")[:] = data.reshape(-1)
        return RingRef(handle, data.nbytes)


def _kv_batch(plan: KvPlan | None):  # -> KvBatch | None
    if plan is None:
        return None
    # NOTE: imported here, not at the top: the launcher imports this module and must not load torch.
    from embedserve.gpu_proc.layers.attention import KvBatch

    return KvBatch(
        prefix_lens=np.asarray(plan.prefix_lens, dtype=np.int32),
        prefix_slots=np.frombuffer(plan.prefix_slots, dtype=np.int32),
        new_slots=np.frombuffer(plan.new_slots, dtype=np.int32),
    )


def run_executor_process(args: ServerArgs, ports: PortArgs, conn: Connection) -> None:
    with child_process("executor", args.log_level, conn) as launcher:
        worker = ExecutorWorker(args, ports, zmq.Context())
        launcher.ready(kv_pool_tokens=worker.runner.kv_pool_tokens)
        worker.run_forever()
