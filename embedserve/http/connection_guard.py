"""Limits on clients that uvicorn does not set, so one client cannot hold what others need.

uvicorn closes a connection idle after a response (keep-alive), and nothing else: a connection that
sends nothing, trickles its headers or stops half-way through its body stays open for good; headers
have no size limit (and httptools joins a long one piece by piece, in time that grows with its
square); a response nobody reads stays in memory for good; and past the open-file limit every client
fails at once. GuardedProtocol, uvicorn's httptools protocol with these limits added:

    request headers   complete within client_timeout of the request's first byte (or of the
                      connection opening), else 408 (nothing sent: closed quietly); at most
                      MAX_HEADER_BYTES, else 431 - counted before they reach the parser
    request body      no pause longer than client_timeout, and at least MIN_BODY_RATE bytes/s on
                      average once client_timeout has passed (Apache's mod_reqtimeout rule), else 408
    response          a client that reads none of it for client_timeout is disconnected
    connections       at most max_connections open; past it a new one gets 503 and is closed

While uvicorn has stopped reading (a pipelined request waits for the one before it, or the app has
not taken the last body piece) the client cannot be late, so no read deadline runs; and no error is
written ahead of an earlier request's pending response, which the client would take for its answer.
The limits are per connection and checked by one timer each, set to the nearest deadline.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import resource
import struct
import termios
import time
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from embedserve.http.errors import ApiError

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # NOTE: nginx allows 32 KiB by default, h11 16 KiB
MIN_BODY_RATE = 500  # NOTE: bytes/s; Apache's default (mod_reqtimeout's body MinRate)
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


def _error_bytes(status: int, message: str, code: str) -> bytes:
    """A whole HTTP response carrying the error, written to the socket below the app."""
    body = ApiError(status, message, code=code).body()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
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
        self._headers_started: float | None = self.loop.time()  # NOTE: None once a request's are in
        self._request_begun = False  # NOTE: its first byte came (httptools' on_message_begin)
        self._header_bytes = 0
        self._body_started: float | None = None  # NOTE: set while a request's body is awaited
        self._body_progress = 0.0
        self._body_bytes = 0
        self._write_stalled_since: float | None = None
        self._write_buffered = 0
        if len(self.connections) > self.max_connections:
            self._refuse_past_the_cap()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._headers_started is None and self._body_started is None:
            self._headers_started = self.loop.time()  # NOTE: the next request's first bytes
            self._arm()
        if self._headers_started is None:
            super().data_received(data)
            return
        # NOTE: fed in two parts when the headers' allowance ends inside this piece, so the parser
        # holds at most MAX_HEADER_BYTES of them (plus, when one read carries the end of a body and
        # the start of the next request, up to that read's size).
        allowed = MAX_HEADER_BYTES - self._header_bytes
        head, rest = (data, b"") if len(data) <= allowed else (data[:allowed], data[allowed:])
        self._header_bytes += len(head)
        super().data_received(head)
        if self._headers_started is not None and self._header_bytes >= MAX_HEADER_BYTES:
            self._close_with(
                431,
                f"The request's line and headers exceed {MAX_HEADER_BYTES} bytes.",
                "headers_too_large",
            )
        elif rest and self.parser is not None and not self.transport.is_closing():
            self.data_received(rest)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._headers_started is None:
            self._headers_started = self.loop.time()

    def on_headers_complete(self) -> None:
        self._headers_started, self._header_bytes, self._request_begun = None, 0, False
        self._body_started = self._body_progress = self.loop.time()
        self._body_bytes = 0
        self._arm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_progress = self.loop.time()
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_started = None
        super().on_message_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_stalled_since = self.loop.time()
        self._write_buffered = self._unsent_bytes()
        self._arm()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_stalled_since = None

    # --- the one timer ---------------------------------------------------------------------------------

    def _deadlines(self) -> list[float]:
        timeout, deadlines = self.client_timeout, []
        if self._headers_started is not None:
            deadlines.append(self._headers_started + timeout)
        if self._body_started is not None:
            deadlines.append(self._body_progress + timeout)
            deadlines.append(self._body_started + timeout + self._body_bytes / MIN_BODY_RATE)
        if self._write_stalled_since is not None:
            deadlines.append(self._write_stalled_since + timeout)
        return deadlines

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
        now, timeout = self.loop.time(), self.client_timeout
        late = f"{timeout:g} s (--client-timeout)"
        if self._write_stalled_since is not None and now - self._write_stalled_since >= timeout:
            buffered = self._unsent_bytes()
            if buffered < self._write_buffered:  # NOTE: it reads, slowly: a stall is no progress at all
                self._write_stalled_since, self._write_buffered = now, buffered
            else:
                logger.warning("Disconnected %s: it read none of its response for %s", self._who(), late)
                self.transport.abort()  # NOTE: close() would wait for the unread bytes to be sent
                return
        if self.flow.read_paused:
            self._excuse(now)  # NOTE: we stopped reading, not the client
        elif self._headers_started is not None and now - self._headers_started >= timeout:
            if self.cycle is not None and not self.cycle.response_complete:
                self._excuse(now)  # NOTE: an earlier response is pending; no error may go ahead of it
            elif not self._request_begun:
                self.transport.close()  # NOTE: an idle connection: nothing to answer
                return
            else:
                self._close_with(408, f"The request's headers took over {late}.", "timeout")
                return
        elif self._body_started is not None and (why := self._body_late(now)):
            if self.cycle is not None and self.cycle.response_complete:
                self.transport.close()  # NOTE: answered without its body (a 401, say): nothing to add
            else:
                self._close_with(408, f"The request's body was too slow: {why}", "timeout")
            return
        self._arm()

    def _unsent_bytes(self) -> int:
        """Bytes of the response the client has not taken: in our buffer, and in the kernel's send
        queue (Linux). The kernel takes ours only in large steps once its buffer is full; what the
        client acknowledges leaves its queue at once."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        try:
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except (AttributeError, OSError):
            pass
        return unsent

    def _body_late(self, now: float) -> str:
        """Why the body is late, or "" while it is not."""
        timeout = self.client_timeout
        if now - self._body_progress >= timeout:
            return f"it paused for over {timeout:g} s (--client-timeout)."
        if now >= self._body_started + timeout + self._body_bytes / MIN_BODY_RATE:
            return f"{self._body_bytes} bytes in {now - self._body_started:.0f} s, under {MIN_BODY_RATE} bytes/s."
        return ""

    def _excuse(self, now: float) -> None:
        """Moves the read deadlines half a timeout on, for a time the client is not to blame for."""
        if self._headers_started is not None:
            self._headers_started = max(self._headers_started, now - self.client_timeout / 2)
        if self._body_started is not None:
            self._body_progress = now
            self._body_started = max(self._body_started, now - self.client_timeout / 2)

    # --- refusals --------------------------------------------------------------------------------------

    def _close_with(self, status: int, message: str, code: str) -> None:
        self._cancel_timer()
        answering = self.cycle is not None and not self.cycle.response_complete
        # NOTE: while headers are read, self.cycle is the request before (uvicorn makes the new one
        # when the headers are in); an error written ahead of its answer would be read as that answer.
        earlier_pending = answering and self._headers_started is not None
        self._headers_started = self._body_started = None
        if answering:
            self.cycle.disconnected = True  # NOTE: the app must not answer on a closed connection
            self.cycle.message_event.set()
        for cycle, _ in self.pipeline:
            cycle.disconnected = True
        if earlier_pending:
            self.transport.abort()
            return
        self.transport.write(_error_bytes(status, message, code))
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
