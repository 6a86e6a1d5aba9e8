"""Typed one-way ZMQ queues: `ZmqPush[T]` sends msgspec messages, `ZmqPull[T]` decodes only type T.

The decoder is bound to a union of message structs, so anything else on the socket is rejected
as a decode error rather than turned into objects (no pickle, ever).
"""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

T = TypeVar("T")
logger = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
# NOTE: a cap on one message keeps a confused peer from making us allocate without bound;
# bulk data travels through the shared-memory rings, so real messages stay far below it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder, data: memoryview) -> Any:
    """The message, or None (logged) for bytes that are not one of the socket's message types.

    NOTE: msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string field;
    ValueError covers both. One bad frame must never stop a process's receive loop.
    """
    try:
        return decoder.decode(data)
    except (ValueError, msgspec.ValidationError) as exc:
        logger.error("Dropped an undecodable message (%d bytes): %s", len(data), exc)
        return None


def _configure(sock: zmq.Socket, addr: str, bind: bool) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    if sock.type == zmq.PULL:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if not addr.startswith("ipc://"):
        raise ValueError(f"embedserve only uses ipc:// sockets, got {addr}")
    sock.bind(addr) if bind else sock.connect(addr)


class ZmqPush(Generic[T]):
    def __init__(self, ctx: zmq.Context, addr: str, bind: bool = False):
        self.sock = ctx.socket(zmq.PUSH)
        _configure(self.sock, addr, bind)

    def send(self, msg: T) -> None:
        self.sock.send(encode(msg), copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class ZmqPull(Generic[T]):
    def __init__(self, ctx: zmq.Context, addr: str, msg_type: Any, bind: bool = True):
        self.sock = ctx.socket(zmq.PULL)
        _configure(self.sock, addr, bind)
        self._decoder = msgspec.msgpack.Decoder(msg_type)

    def recv(self, timeout_ms: int | None = None) -> T | None:
        """The next message, or None when none arrives within `timeout_ms` (None waits forever)."""
        while True:
            if timeout_ms is not None and not self.sock.poll(timeout_ms):
                return None
            msg = _decode(self._decoder, self.sock.recv(copy=False).buffer)
            if msg is not None:
                return msg

    def drain(self, limit: int = 4096) -> list[T]:
        """Every message already waiting, without blocking (bounded so one loop turn stays short)."""
        out: list[T] = []
        while len(out) < limit:
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msg = _decode(self._decoder, frame.buffer)
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


class AsyncZmqPush(Generic[T]):
    def __init__(self, ctx: zmq.asyncio.Context, addr: str, bind: bool = False):
        self.sock = ctx.socket(zmq.PUSH)
        _configure(self.sock, addr, bind)

    async def send(self, msg: T) -> None:
        await self.sock.send(encode(msg), copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class AsyncZmqPull(Generic[T]):
    def __init__(self, ctx: zmq.asyncio.Context, addr: str, msg_type: Any, bind: bool = True):
        self.sock = ctx.socket(zmq.PULL)
        _configure(self.sock, addr, bind)
        self._decoder = msgspec.msgpack.Decoder(msg_type)

    async def recv(self) -> T:
        while True:
            frame = await self.sock.recv(copy=False)
            msg = _decode(self._decoder, frame.buffer)
            if msg is not None:
                return msg

    def close(self) -> None:
        self.sock.close(linger=0)
