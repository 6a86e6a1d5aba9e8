"""Limits on clients that uvicorn does not set, so one client cannot hold what others need.

uvicorn closes a connection idle after a response (keep-alive), and nothing else: a connection that
sends nothing, trickles its headers or stops half-way through its body stays open for good; headers
have no size limit (and httptools joins a long one piece by piece, in time that grows with its
square); a response nobody reads stays in memory for good; and past the open-file limit every client
fails at once. GuardedProtocol, uvicorn's httptools protocol with these limits added:

    request headers   complete within client_timeout of the connection opening or the request's
                      first byte, else 408 (nothing sent: closed quietly); at most MAX_HEADER_BYTES,
                      else 431 - counted before they reach the parser
    request body      no pause longer than client_timeout between two pieces, else 408
    response          a client that reads none of it for client_timeout is disconnected
    connections       at most max_connections open; past it a new one gets 503 and is closed

The limits are per connection and checked by one timer each, set to the nearest deadline.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # NOTE: nginx allows 32 KiB by default, h11 16 KiB
FILE_DESCRIPTORS_KEPT = 256  # NOTE: for the process's own files, ZMQ sockets and shared memory
MOST_FILE_DESCRIPTORS = 65536
CAP_WARNING_EVERY_S = 10.0


def raise_open_file_limit() -> int:
    """Raises this process's soft open-file limit to its hard one (up to MOST_FILE_DESCRIPTORS), as
    servers do, and returns the connections that leave room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MOST_FILE_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, MOST_FILE_DESCRIPTORS)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(1, soft - FILE_DESCRIPTORS_KEPT)


def _error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedProtocol(HttpToolsProtocol):
    client_timeout: float = 30.0
    max_connections: int = 10_000
    _last_cap_warning = 0.0  # NOTE: class-wide, shared by every connection of the process

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._headers_started = self.loop.time()  # NOTE: None once a request's headers are in
        self._header_bytes = 0
        self._body_progress: float | None = None  # NOTE: last body bytes, while a body is awaited
        self._write_paused_since: float | None = None
        if len(self.connections) > self.max_connections:
            self._refuse_past_the_cap()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._headers_started is None and self._body_progress is None:
            self._headers_started = self.loop.time()  # NOTE: the next request's first bytes
            self._arm()
        if self._body_progress is not None:
            self._body_progress = self.loop.time()
        if self._headers_started is None:
            super().data_received(data)
            return
        # NOTE: fed in two parts when the headers' allowance ends inside this piece, so the parser
        # never holds more than MAX_HEADER_BYTES of headers.
        allowed = MAX_HEADER_BYTES - self._header_bytes
        head, rest = (data, b"") if len(data) <= allowed else (data[:allowed], data[allowed:])
        self._header_bytes += len(head)
        super().data_received(head)
        if self._headers_started is not None and self._header_bytes >= MAX_HEADER_BYTES:
            self._close_with(
                431,
                "Request Header Fields Too Large",
                f"The request's line and headers exceed {MAX_HEADER_BYTES} bytes.",
                "headers_too_large",
            )
        elif rest and self.parser is not None and not self.transport.is_closing():
            self.data_received(rest)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_started is None:
            self._headers_started = self.loop.time()

    def on_headers_complete(self) -> None:
        self._headers_started, self._header_bytes = None, 0
        self._body_progress = self.loop.time()
        self._arm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_progress = None
        super().on_message_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused_since = self.loop.time()
        self._arm()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused_since = None

    # --- the one timer ---------------------------------------------------------------------------------

    def _deadlines(self) -> list[float]:
        started = [self._headers_started, self._body_progress, self._write_paused_since]
        return [t + self.client_timeout for t in started if t is not None]

    def _arm(self) -> None:
        self._cancel_timer()
        deadlines = self._deadlines()
        if deadlines and not self.transport.is_closing():
            self._timer = self.loop.call_at(min(deadlines), self._check)

    def _cancel_timer(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        late = f"{self.client_timeout:g} s (--client-timeout)"
        if self._write_paused_since is not None and now - self._write_paused_since >= self.client_timeout:
            logger.warning("Disconnected %s: it read none of its response for %s", self._who(), late)
            self.transport.abort()  # NOTE: close() would wait for the unread bytes to be sent
        elif self._headers_started is not None and now - self._headers_started >= self.client_timeout:
            if self._header_bytes == 0:
                self.transport.close()  # NOTE: an idle connection: nothing to answer
            else:
                self._close_with(
                    408, "Request Timeout", f"The request's headers took over {late}.", "timeout"
                )
        elif self._body_progress is not None and now - self._body_progress >= self.client_timeout:
            if self.flow.read_paused:  # NOTE: we stopped reading, not the client
                self._body_progress = now
                self._arm()
            else:
                self._close_with(
                    408, "Request Timeout", f"The request's body paused for over {late}.", "timeout"
                )
        else:
            self._arm()

    # --- refusals --------------------------------------------------------------------------------------

    def _close_with(self, status: int, reason: str, message: str, code: str) -> None:
        self._cancel_timer()
        self._headers_started = self._body_progress = None
        if self.cycle is not None and not self.cycle.response_complete:
            # NOTE: the app has the request: it must not answer on a connection answered here.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(_error_bytes(status, reason, message, code))
        self.transport.close()

    def _refuse_past_the_cap(self) -> None:
        now = time.monotonic()
        if now - GuardedProtocol._last_cap_warning >= CAP_WARNING_EVERY_S:
            GuardedProtocol._last_cap_warning = now
            logger.warning(
                "%d connections are open, the most this server keeps (--max-connections %d): "
                "new ones get 503 until some close",
                len(self.connections) - 1,
                self.max_connections,
            )
        self._close_with(
            503,
            "Service Unavailable",
            f"The server has {self.max_connections} connections open, its limit; try again shortly.",
            "too_many_connections",
        )

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def guarded_protocol(client_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's limits."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"client_timeout": client_timeout, "max_connections": max_connections},
    )
