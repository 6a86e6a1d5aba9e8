"""The HTTP process's door to the pipeline: submit a request, await its encoded body, abort if the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

import zmq.asyncio

from embedserve.http.errors import ApiError
from embedserve.http.metrics import ServerMetrics
from embedserve.ipc.ports import PortArgs
from embedserve.ipc.shm_ring import ShmRing
from embedserve.ipc.zmq_queue import AsyncZmqPull, AsyncZmqPush
from embedserve.messages import (
    AbortRequest,
    EmbedRequest,
    FlushCache,
    FlushDone,
    HttpInput,
    RequestFailed,
    RequestMeta,
    ResponseReady,
    SchedulerStats,
    ServerState,
    TokenizerInput,
)

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its response was ready; the request was aborted."""


RETRY_AFTER = {"Retry-After": "1"}


class PipelineClient:
    def __init__(
        self, ports: PortArgs, max_queued_requests: int, request_timeout: float | None, metrics: ServerMetrics
    ):
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.request_timeout = request_timeout
        self._ctx = zmq.asyncio.Context()
        self._ports = ports
        self.response_ring = ShmRing.attach(ports.response_ring)
        self.to_tokenizer: AsyncZmqPush[TokenizerInput] = AsyncZmqPush(self._ctx, ports.tokenizer_addr)
        self.inbox: AsyncZmqPull[HttpInput] = AsyncZmqPull(self._ctx, ports.http_addr, HttpInput)
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        # NOTE: read at scrape time, not set twice on every request's path
        metrics.in_flight.labels(metrics.model_name).set_function(lambda: len(self.waiting))
        self.ready = False  # warm-up passed
        self.draining = False  # shutting down: no new requests
        self._handlers = {
            ResponseReady: self._on_response,
            RequestFailed: self._on_failure,
            ServerState: self._on_state,
            SchedulerStats: metrics.apply,
            FlushDone: self._on_flush_done,
        }
        self.flushes: dict[str, asyncio.Future[FlushDone]] = {}
        # /health_generate's probe request: apart from `waiting`, so it counts toward no limit,
        # gauge, drain or flush; one at a time, shared by the checks that come while it runs.
        self._probe: asyncio.Future[bytes] | None = None
        self._probe_rid = ""
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        while True:
            msg = await self.inbox.recv()
            try:
                self._handlers[type(msg)](msg)
            except Exception:  # a bad message must not stop every later response
                logger.exception("Could not deliver %s", type(msg).__name__)

    def _on_response(self, msg: ResponseReady) -> None:
        body = bytes(self.response_ring.view(msg.body.offset, msg.body.nbytes))
        self.response_ring.release(msg.body.offset)
        future = self._future_of(msg.rid)
        if future is not None and not future.done():
            future.set_result(body)
            if future is self._probe:
                return
            # NOTE: after the handler wakes (call_soon keeps order): ~40 us the response waited for
            asyncio.get_running_loop().call_soon(
                self.metrics.observe_served, msg.prompt_tokens, msg.cached_tokens, msg.output_seconds
            )

    def _on_failure(self, msg: RequestFailed) -> None:
        future = self._future_of(msg.rid)
        if future is not None and not future.done():
            headers = RETRY_AFTER if msg.status == 429 else None
            future.set_exception(ApiError(msg.status, msg.message, msg.type, msg.param, msg.code, headers))

    def _on_flush_done(self, msg: FlushDone) -> None:
        future = self.flushes.pop(msg.flush_id, None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def flush_cache(self) -> FlushDone:
        """Ask the scheduler to drop every cached prefix and embedding; refused while requests are in flight."""
        if self.waiting:
            return FlushDone(
                flush_id="",
                ok=False,
                message=f"Cannot flush the cache while {len(self.waiting)} requests are in flight.",
            )
        flush_id = uuid.uuid4().hex
        future: asyncio.Future[FlushDone] = asyncio.get_running_loop().create_future()
        self.flushes[flush_id] = future
        try:
            await self.to_tokenizer.send(FlushCache(flush_id=flush_id))
            return await asyncio.wait_for(future, timeout=30)
        finally:
            self.flushes.pop(flush_id, None)

    def _on_state(self, msg: ServerState) -> None:
        self.ready, self.draining = msg.ready, msg.draining
        self.metrics.counting_requests |= msg.ready
        if self.draining and self._probe is not None and not self._probe.done():
            # NOTE: its checks answer "shutting down" now, not hold the drain until the probe is back
            self._probe.set_exception(ApiError(503, "The server is shutting down."))
        if msg.abandon:
            self.fail_all(f"The server is stopping: {msg.abandon}. This request was not finished; retry it.")

    def fail_all(self, message: str) -> int:
        """Answer every request still in flight with 503 `message` (the server is stopping), rather
        than leave its client to a dropped connection; returns how many there were."""
        pending = [future for future in self.waiting.values() if not future.done()]
        for future in pending:
            future.set_exception(ApiError(503, message, code="server_stopping"))
        if pending:
            logger.warning("%d requests in flight answered 503: %s", len(pending), message)
        return len(pending)

    async def embed(self, request: EmbedRequest, client_gone: Callable[[], Awaitable[None]]) -> bytes:
        """Submit `request`; its encoded body, or ClientGone if `client_gone()` completes first."""
        if self.draining:
            raise ApiError(503, "The server is shutting down and accepts no new requests.")
        if len(self.waiting) >= self.max_queued_requests:
            raise ApiError(
                429,
                f"The server is at capacity: {len(self.waiting)} requests are in progress "
                f"(--max-queued-requests). Retry shortly.",
                "rate_limit_error",
                None,
                "queue_full",
                RETRY_AFTER,
            )
        rid = request.meta.rid
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = future
        watcher = asyncio.ensure_future(_fail_when_gone(future, client_gone, rid))
        try:
            await self.to_tokenizer.send(request)
            try:
                # NOTE: the future itself, not asyncio.wait on it and the watcher: one loop turn
                # fewer between the answer arriving and its response going out.
                return await asyncio.wait_for(future, self.request_timeout)
            except ClientGone:
                await self.abort(rid)
                raise
            except asyncio.TimeoutError:
                await self.abort(rid)
                raise ApiError(
                    504,
                    f"The request did not finish within {self.request_timeout} s "
                    "(--request-timeout) and was aborted.",
                    "timeout_error",
                    None,
                    "request_timeout",
                ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self.abort(rid))
            raise
        finally:
            watcher.cancel()
            self.waiting.pop(rid, None)

    async def probe(self, timeout: float) -> str | None:
        """None once a one-word request has gone through the whole pipeline within `timeout`
        seconds, else why not. The probe runs ahead of the queue (the scheduler puts it first), so a
        busy server answers it within a batch or two. A check that comes while a probe is out waits
        for that one (a flood of checks sends one request), for its own `timeout`."""
        if self._probe is None or self._probe.done():
            self._probe_rid = f"health-{uuid.uuid4().hex}"
            self._probe = asyncio.get_running_loop().create_future()
            # NOTE: its failure is read by the checks waiting then, if any: never "never retrieved"
            self._probe.add_done_callback(lambda f: f.cancelled() or f.exception())
            meta = RequestMeta(
                rid=self._probe_rid, api="encode", model="", lengths=[], single=True, probe=True
            )
            await self.to_tokenizer.send(EmbedRequest(meta=meta, texts=["health"]))
        probe = self._probe
        try:
            await asyncio.wait_for(asyncio.shield(probe), timeout)
        except asyncio.TimeoutError:
            return f"a probe request was not answered within {timeout:g} s (--health-check-timeout)"
        except ApiError as exc:
            return f"the probe request failed: {exc}"
        return None

    def _future_of(self, rid: str) -> asyncio.Future[bytes] | None:
        """What awaits the answer to `rid`: a client's request (no longer waiting once answered), or
        the health probe."""
        return self._probe if rid == self._probe_rid else self.waiting.pop(rid, None)

    async def abort(self, rid: str) -> None:
        self.waiting.pop(rid, None)
        await self.to_tokenizer.send(AbortRequest(rid=rid))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.to_tokenizer.close()
        self.inbox.close()
        self.response_ring.close()


async def _fail_when_gone(
    future: asyncio.Future[bytes], client_gone: Callable[[], Awaitable[None]], rid: str
) -> None:
    """Fails `future` with ClientGone once `client_gone()` completes first (the client left)."""
    with contextlib.suppress(Exception):  # NOTE: a receive that fails means the client is gone too
        await client_gone()
    if not future.done():
        future.set_exception(ClientGone(rid))
