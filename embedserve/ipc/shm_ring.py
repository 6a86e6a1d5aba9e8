"""A byte ring buffer in a shared-memory file, through which processes pass bulk data.

A ZMQ message carries only a handle and a byte count; the receiver reads the payload in place
with `view()` and frees it with `release()`. Writers in any process append at the head; blocks
may be released in any order, and the tail moves over the oldest blocks once they are free.

Layout of the file (every offset a multiple of 64, so numpy views of the payloads are aligned):

    0        64                                                          64 + capacity
    +--------+-----------------------------------------------------------+
    | header | [blk hdr|payload..][PAD.....][blk hdr|payload]  ...        |
    +--------+-----------------------------------------------------------+
                 ^ tail % capacity                ^ head % capacity

NOTE: head and tail are 64-bit byte counters that only ever grow; a block's position is
`counter % capacity`. A handle is the counter at which its block starts, so a stale handle
(its block reclaimed, the space reused) falls below the tail and is refused, however many
times the ring has wrapped since.
NOTE: a block never straddles the end of the buffer: a PAD record fills the rest of the lap
and the block starts at offset 0.
NOTE: head/tail and block states change only under `flock` on this object's own fd (other
processes) plus a `threading.Lock` (other threads); nobody sleeps holding them. A process
killed while holding the flock releases it by dying.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import struct
import threading
import time

_ALIGN = 64
_HDR_BYTES = 64  # ring header; also the size of each block header
_MAGIC = 0x474E495245424D45  # b"EMBERING" read as little-endian u64
_VERSION = 1
# Ring header, as u64 slots of the mapping.
_H_MAGIC, _H_VERSION, _H_CAPACITY, _H_HEAD, _H_TAIL, _H_KEY = range(6)

# Block header: state, unused, payload bytes, span (header + payload + padding), seal.
_BLOCK = struct.Struct("<IIQQQ")
_LIVE, _FREE, _PAD = 0x4556494C, 0x45455246, 0x44444150  # b"LIVE", b"FREE", b"PADD"

_MIN_SLEEP = 20e-6  # first wait for space, doubling up to _MAX_SLEEP
_MAX_SLEEP = 2e-3


class RingFullTimeout(TimeoutError):
    """write/reserve waited longer than its timeout for space to free up."""


class RingCorruptRef(ValueError):
    """A handle/nbytes pair that does not name a live block (hostile, stale or released)."""


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _RingLock:
    """Thread lock + flock on the ring's fd: excludes threads of this object and other processes."""

    def __init__(self, ring: ShmRing) -> None:
        self._ring = ring
        self._thread_lock = threading.Lock()

    def __enter__(self) -> None:
        self._ring._reopen_after_fork()
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._ring._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._ring._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


class ShmRing:
    """A shared-memory ring of variable-size blocks; see the module docstring for the layout."""

    def __init__(self, path: str, fd: int) -> None:
        """Use `create` or `attach`; this maps an already initialised file."""
        self.path = path
        self._fd = fd
        self._pid = os.getpid()
        self._unlinked = False
        size = os.fstat(fd).st_size
        if size < 2 * _HDR_BYTES:
            raise ValueError(f"{path}: {size} bytes is too small to be a ring")
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = memoryview(self._mm)
        self._hdr = self._buf[:_HDR_BYTES].cast("Q")
        self.capacity = size - _HDR_BYTES
        self._lock = _RingLock(self)

    @classmethod
    def create(cls, path: str, capacity: int) -> ShmRing:
        """Create a new ring file at `path` (which must not exist) with `capacity` payload bytes.

        The capacity is rounded up to a multiple of 64; `ring.capacity` tells the actual size.
        """
        if capacity < 2 * _ALIGN:
            raise ValueError(f"capacity must be at least {2 * _ALIGN} bytes, got {capacity}")
        capacity = _round_up(capacity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # NOTE: the mode given to open is masked by the umask; make it exact
            os.ftruncate(fd, _HDR_BYTES + capacity)
            ring = cls(path, fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        hdr = ring._hdr
        hdr[_H_VERSION], hdr[_H_CAPACITY] = _VERSION, capacity
        hdr[_H_HEAD] = hdr[_H_TAIL] = 0
        # The key seals block headers, so payload bytes that mimic a header never pass as one.
        hdr[_H_KEY] = secrets.randbits(64)
        hdr[_H_MAGIC] = _MAGIC  # last: an attach that races with create sees no magic yet
        return ring

    @classmethod
    def attach(cls, path: str) -> ShmRing:
        """Map an existing ring created (possibly) by another process."""
        fd = os.open(path, os.O_RDWR)
        try:
            ring = cls(path, fd)
        except BaseException:
            os.close(fd)
            raise
        hdr = ring._hdr
        if hdr[_H_MAGIC] != _MAGIC or hdr[_H_VERSION] != _VERSION or hdr[_H_CAPACITY] != ring.capacity:
            ring.close()
            raise ValueError(f"{path} is not an initialised ShmRing")
        return ring

    @property
    def max_block_bytes(self) -> int:
        """The largest payload a single write can ever accept (it needs the whole, empty ring)."""
        return self.capacity - _HDR_BYTES

    def write(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> int:
        """Copy `data` into the ring and return its handle; waits for space like `reserve`."""
        src = memoryview(data)
        if not src.c_contiguous:
            src = memoryview(src.tobytes())
        src = src.cast("B")
        handle, dst = self.reserve(src.nbytes, timeout)
        dst[:] = src
        return handle

    def reserve(self, nbytes: int, timeout: float | None = None) -> tuple[int, memoryview]:
        """Allocate a block of `nbytes` and return (handle, writable view) to fill in place.

        Sleeps with backoff while the ring is full; raises RingFullTimeout after `timeout`
        seconds (None waits forever) and ValueError if `nbytes` exceeds `max_block_bytes`.
        """
        if not 0 <= nbytes <= self.max_block_bytes:
            raise ValueError(f"block of {nbytes} bytes can never fit a ring of {self.capacity} bytes")
        span = _HDR_BYTES + _round_up(nbytes)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        delay = _MIN_SLEEP
        while True:
            with self._lock:
                handle = self._try_alloc(nbytes, span)
            if handle is not None:
                start = _HDR_BYTES + handle % self.capacity + _HDR_BYTES
                return handle, self._buf[start : start + nbytes]
            pause = delay
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RingFullTimeout(f"no room for {nbytes} bytes in {self.path} after {timeout}s")
                pause = min(delay, left)
            time.sleep(pause)
            delay = min(delay * 2, _MAX_SLEEP)

    def view(self, handle: int, nbytes: int) -> memoryview:
        """A read-only view of a live block's payload; RingCorruptRef unless (handle, nbytes) names one.

        NOTE: the view aliases the ring: do not use it after `release(handle)`.
        """
        pos, stored = self._check_live(handle)
        if type(nbytes) is not int or nbytes != stored:
            raise RingCorruptRef(f"handle {handle} holds {stored} bytes, not {nbytes!r}")
        start = _HDR_BYTES + pos + _HDR_BYTES
        return self._buf[start : start + nbytes].toreadonly()

    def release(self, handle: int) -> None:
        """Free a live block (any process, any order); RingCorruptRef if it is not live."""
        with self._lock:
            pos, _ = self._check_live(handle)
            struct.pack_into("<I", self._buf, _HDR_BYTES + pos, _FREE)
            if handle == self._hdr[_H_TAIL]:
                self._reclaim()

    def used_bytes(self) -> int:
        """Bytes between tail and head: live and not-yet-reclaimed blocks, headers and padding."""
        with self._lock:
            return self._hdr[_H_HEAD] - self._hdr[_H_TAIL]

    def check_integrity(self) -> None:
        """Walk every record from tail to head; raise AssertionError on any inconsistency (tests)."""
        with self._lock:
            head, tail = self._hdr[_H_HEAD], self._hdr[_H_TAIL]
            assert 0 <= head - tail <= self.capacity, (head, tail)
            counter = tail
            while counter < head:
                pos = counter % self.capacity
                state, _, nbytes, span, _ = _BLOCK.unpack_from(self._buf, _HDR_BYTES + pos)
                assert state in (_LIVE, _FREE, _PAD), (counter, hex(state))
                assert span >= _HDR_BYTES + nbytes and span % _ALIGN == 0, (counter, span, nbytes)
                assert pos + span <= self.capacity, (counter, span)
                assert counter != tail or state == _LIVE, "a free block sits at the tail"
                counter += span
            assert counter == head, (counter, head)

    def close(self) -> None:
        """Unmap and close the fd; idempotent. Outstanding views keep the mapping alive until dropped."""
        if self._mm is None:
            return
        self._hdr.release()
        self._buf.release()
        # A caller may still hold a view: then the mapping goes away with the last one.
        with contextlib.suppress(BufferError):
            self._mm.close()
        self._mm = None
        os.close(self._fd)

    def unlink(self) -> None:
        """Remove the backing file; idempotent. Processes that mapped it keep their mapping."""
        if self._unlinked:
            return
        self._unlinked = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # ---- internals: every method below except _check_live runs under self._lock ----------------

    def _try_alloc(self, nbytes: int, span: int) -> int | None:
        """Claim `span` bytes at the head; the handle, or None while there is no room."""
        hdr, cap = self._hdr, self.capacity
        head, tail = hdr[_H_HEAD], hdr[_H_TAIL]
        pos = head % cap
        if pos + span > cap:
            pad = cap - pos
            if cap - (head - tail) < pad:
                return None
            # Pad eagerly even if the block itself does not fit yet: the next lap starts at 0
            # either way, and an empty ring then reclaims the pad at once.
            _BLOCK.pack_into(self._buf, _HDR_BYTES + pos, _PAD, 0, 0, pad, head ^ hdr[_H_KEY])
            head += pad
            hdr[_H_HEAD] = head
            if tail + pad == head:
                self._reclaim()
            tail, pos = hdr[_H_TAIL], 0
        if cap - (head - tail) < span:
            return None
        _BLOCK.pack_into(self._buf, _HDR_BYTES + pos, _LIVE, 0, nbytes, span, head ^ hdr[_H_KEY])
        hdr[_H_HEAD] = head + span
        return head

    def _reclaim(self) -> None:
        """Advance the tail over every free block and pad record at the front of the ring."""
        hdr, cap = self._hdr, self.capacity
        head, tail = hdr[_H_HEAD], hdr[_H_TAIL]
        while tail < head:
            state, _, _, span, _ = _BLOCK.unpack_from(self._buf, _HDR_BYTES + tail % cap)
            if state == _LIVE:
                break
            if span < _HDR_BYTES or span % _ALIGN or tail % cap + span > cap:
                raise RuntimeError(f"{self.path}: corrupt record at counter {tail} (span {span})")
            tail += span
        hdr[_H_TAIL] = tail

    def _check_live(self, handle: int) -> tuple[int, int]:
        """(ring position, payload bytes) of live block `handle`, or RingCorruptRef.

        NOTE: runs unlocked from view(): the range and seal checks reject anything that is not
        a live block header, and every read stays inside the mapping whatever the input.
        """
        if type(handle) is not int:
            raise RingCorruptRef(f"handle must be an int, got {type(handle).__name__}")
        hdr = self._hdr
        if not hdr[_H_TAIL] <= handle < hdr[_H_HEAD] or handle % _ALIGN:
            raise RingCorruptRef(f"handle {handle} is not a live block")
        pos = handle % self.capacity
        state, _, nbytes, span, seal = _BLOCK.unpack_from(self._buf, _HDR_BYTES + pos)
        if state != _LIVE or seal != handle ^ hdr[_H_KEY] or span != _HDR_BYTES + _round_up(nbytes):
            raise RingCorruptRef(f"handle {handle} is not a live block")
        if pos + span > self.capacity:
            raise RingCorruptRef(f"handle {handle} is not a live block")
        return pos, nbytes

    def _reopen_after_fork(self) -> None:
        """After fork the child shares the parent's open file, hence its flock: take a fresh one."""
        if os.getpid() == self._pid:
            return
        # /proc/self/fd reopens the same inode even after the path was unlinked.
        inherited, self._fd = self._fd, os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR)
        os.close(inherited)  # closing our copy leaves a parent's lock on the shared file intact
        self._pid = os.getpid()
        self._lock._thread_lock = threading.Lock()  # a forked copy may be held by a dead thread

    def __reduce__(self) -> tuple[object, tuple[str]]:
        """Pickling (e.g. as a spawn-process argument) sends the path; the receiver attaches."""
        return (ShmRing.attach, (self.path,))

    def __repr__(self) -> str:
        return f"ShmRing({self.path!r}, capacity={self.capacity})"
