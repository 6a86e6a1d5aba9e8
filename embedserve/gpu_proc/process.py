"""The executor process: runs each batch through the model and hands embeddings to the output process.

A failing forward fails only its batch: every request in it gets a 500 with the error, and the
executor goes on serving. Embeddings leave through the embedding ring; the batch's rows travel
with the same message, so the output process sees metas, rows and drops in scheduling order.
"""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import Connection

import numpy as np
import zmq

from embedserve.ipc.child import child_process
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
    RingRef,
    SchedulerInput,
)
from embedserve.model_config import model_config_from_args
from embedserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class ExecutorWorker:
    def __init__(self, args: ServerArgs, ports: PortArgs, ctx: zmq.Context):
        from embedserve.gpu_proc.model_runner import ModelRunner

        config = model_config_from_args(args)
        self.runner = ModelRunner(
            config, device=args.device, dtype=args.dtype, num_threads=args.executor_threads
        )
        self.token_ring = ShmRing.attach(ports.token_ring)
        self.embedding_ring = ShmRing.attach(ports.embedding_ring)
        self.inbox: ZmqPull[ExecutorInput] = ZmqPull(ctx, ports.executor_addr, ExecutorInput)
        self.to_scheduler: ZmqPush[SchedulerInput] = ZmqPush(ctx, ports.scheduler_addr)
        self.to_output: ZmqPush[DetokenizerInput] = ZmqPush(ctx, ports.detokenizer_addr)
        self._handlers = {ForwardBatch: self.run_batch, DropRequests: self.to_output.send}
        # NOTE: a fault-injection hook for the tests of "a crash in the forward fails only its batch";
        # unset in production, where nothing else reads it.
        fail_token = os.environ.get("EMBEDSERVE_TEST_FAIL_TOKEN_ID")
        self._fail_token = int(fail_token) if fail_token else None

    def run_forever(self) -> None:
        while True:
            msg = self.inbox.recv()
            self._handlers[type(msg)](msg)

    def run_batch(self, batch: ForwardBatch) -> None:
        rows = [(s.rid, s.index) for s in batch.seqs]
        out = BatchEmbeddings(
            batch_id=batch.batch_id,
            rows=rows,
            embeddings=None,
            dim=self.runner.hidden_size,
            new_requests=batch.new_requests,
            dropped=batch.dropped,
        )
        started = time.perf_counter()
        try:
            tokens = self._gather_tokens(batch)
            if self._fail_token is not None and (tokens == self._fail_token).any():
                raise RuntimeError(f"injected fault on token {self._fail_token}")
            embeddings = self.runner.embed(tokens, [s.length for s in batch.seqs])
            out.embeddings = self._publish(embeddings)
        except Exception as exc:
            logger.exception("Forward of batch %d failed", batch.batch_id)
            out.error = f"The model failed on this batch: {type(exc).__name__}: {exc}"
        # NOTE: the output message goes first: once the scheduler hears "done" it may free the tokens.
        self.to_output.send(out)
        failed = sorted({s.rid for s in batch.seqs}) if out.error else []
        self.to_scheduler.send(
            BatchDone(
                batch_id=batch.batch_id, forward_seconds=time.perf_counter() - started, failed_rids=failed
            )
        )

    def _gather_tokens(self, batch: ForwardBatch) -> np.ndarray:
        parts = []
        for seq in batch.seqs:
            block = np.frombuffer(self.token_ring.view(seq.tokens.offset, seq.tokens.nbytes), dtype="<i4")
            parts.append(block[seq.start : seq.start + seq.length])
        return np.concatenate(parts)  # a copy: the ring slot may be reused once the batch is done

    def _publish(self, embeddings: np.ndarray) -> RingRef:
        data = np.ascontiguousarray(embeddings, dtype="<f4")
        handle, view = self.embedding_ring.reserve(data.nbytes)
        np.frombuffer(view, dtype="<f4")[:] = data.reshape(-1)
        return RingRef(handle, data.nbytes)


def run_executor_process(args: ServerArgs, ports: PortArgs, conn: Connection) -> None:
    with child_process("executor", args.log_level, conn) as launcher:
        worker = ExecutorWorker(args, ports, zmq.Context())
        launcher.ready(hidden_size=worker.runner.hidden_size, dtype=str(worker.runner.torch_dtype))
        worker.run_forever()
