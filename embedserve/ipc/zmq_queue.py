"""Typed one-way ZMQ queues: `ZmqPush[T]` sends msgspec messages, `ZmqPull[T]` decodes only type T.

The decoder is bound to a union of message structs, so anything else on the socket is rejected
as a decode error rather than turned into objects (no pickle, ever).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
# NOTE: a cap on one message keeps a confused peer from making us allocate without bound;
# bulk data travels through the shared-memory rings, so real messages stay far below it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


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
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return self._decoder.decode(self.sock.recv(copy=False).buffer)

    def drain(self, limit: int = 4096) -> list[T]:
        """Every message already waiting, without blocking (bounded so one loop turn stays short)."""
        out: list[T] = []
        while len(out) < limit:
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            out.append(self._decoder.decode(frame.buffer))
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
        frame = await self.sock.recv(copy=False)
        return self._decoder.decode(frame.buffer)

    def close(self) -> None:
        self.sock.close(linger=0)
