"""The output process: collects each request's rows as batches finish, then encodes and hands off its body.

Rows, metas and drops all arrive on one socket from the executor, in scheduling order, so a
request's meta always precedes its rows and a drop always follows its last row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import zmq

from embedserve.detok_proc.response_builder import BODY_BUILDERS
from embedserve.ipc.child import child_process
from embedserve.ipc.heap import HeapTrimmer
from embedserve.ipc.ports import PortArgs
from embedserve.ipc.shm_ring import ShmRing
from embedserve.ipc.zmq_queue import ZmqPull, ZmqPush
from embedserve.messages import (
    BatchEmbeddings,
    DetokenizerInput,
    DropRequests,
    HttpInput,
    RequestFailed,
    RequestMeta,
    ResponseReady,
    RingRef,
)
from embedserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class _Assembly:
    meta: RequestMeta
    vectors: np.ndarray | None  # [inputs, dim], allocated when the first row arrives
    missing: int  # rows not yet received
    cached: list[int]  # tokens of each input answered from a cache
    failed: bool = False  # an error was already sent; later rows are only counted


class OutputWorker:
    def __init__(self, ports: PortArgs, ctx: zmq.Context):
        self.embedding_ring = ShmRing.attach(ports.embedding_ring)
        self.response_ring = ShmRing.attach(ports.response_ring)
        self.inbox: ZmqPull[DetokenizerInput] = ZmqPull(ctx, ports.detokenizer_addr, DetokenizerInput)
        self.to_http: ZmqPush[HttpInput] = ZmqPush(ctx, ports.http_addr)
        self.pending: dict[str, _Assembly] = {}
        self._handlers = {BatchEmbeddings: self.on_batch, DropRequests: self.on_drop}
        self.trimmer = HeapTrimmer()

    def run_forever(self) -> None:
        while True:
            msg = self.trimmer.next_message(self.inbox)
            self._handlers[type(msg)](msg)

    def on_drop(self, msg: DropRequests) -> None:
        for rid in msg.rids:
            self.pending.pop(rid, None)

    def on_batch(self, msg: BatchEmbeddings) -> None:
        for meta in msg.new_requests:
            self.pending[meta.rid] = _Assembly(
                meta, None, missing=len(meta.lengths), cached=[0] * len(meta.lengths)
            )
        if msg.embeddings is None:
            self._fail_rows(msg.rows, msg.error or "The model failed on this batch.")
        else:
            self._collect(msg.rows, msg.row_cached, msg.embeddings, msg.dim)
        self.on_drop(DropRequests(rids=msg.dropped))
        self.trimmer.after_work()

    def _collect(self, rows: list[tuple[str, int]], row_cached: list[int], ref: RingRef, dim: int) -> None:
        block = np.frombuffer(self.embedding_ring.view(ref.offset, ref.nbytes), dtype="<f4")
        matrix = block.reshape(len(rows), dim)
        finished = []
        for row, (rid, index) in enumerate(rows):
            assembly = self.pending.get(rid)
            if assembly is None:
                continue  # dropped: its client went away
            if assembly.vectors is None:
                assembly.vectors = np.empty((len(assembly.meta.lengths), dim), dtype=np.float32)
            assembly.vectors[index] = matrix[row]
            assembly.cached[index] = row_cached[row]
            assembly.missing -= 1
            if assembly.missing == 0:
                finished.append(rid)
        del block, matrix
        self.embedding_ring.release(ref.offset)
        for rid in finished:
            self._respond(self.pending.pop(rid))

    def _fail_rows(self, rows: list[tuple[str, int]], error: str) -> None:
        for rid, _ in rows:
            assembly = self.pending.get(rid)
            if assembly is None:
                continue
            if not assembly.failed:
                assembly.failed = True
                self.to_http.send(RequestFailed(rid=rid, status=500, message=error, type="server_error"))
            assembly.missing -= 1
            if assembly.missing == 0:
                del self.pending[rid]

    def _respond(self, assembly: _Assembly) -> None:
        if assembly.failed or assembly.vectors is None:
            return
        started = time.perf_counter()
        body = BODY_BUILDERS[assembly.meta.api](assembly.meta, assembly.vectors, assembly.cached)
        if len(body) > self.response_ring.max_block_bytes:
            self.to_http.send(
                RequestFailed(
                    rid=assembly.meta.rid,
                    status=500,
                    type="server_error",
                    message=f"The response ({len(body)} bytes) exceeds the server's response buffer.",
                )
            )
            return
        handle = self.response_ring.write(body)
        self.to_http.send(
            ResponseReady(
                rid=assembly.meta.rid,
                body=RingRef(handle, len(body)),
                prompt_tokens=sum(assembly.meta.lengths),
                cached_tokens=sum(assembly.cached),
                output_seconds=time.perf_counter() - started,
            )
        )


def run_detokenizer_process(args: ServerArgs, ports: PortArgs, conn: Connection) -> None:
    with child_process("detokenizer", args.log_level, conn) as launcher:
        worker = OutputWorker(ports, zmq.Context())
        launcher.ready()
        worker.run_forever()
