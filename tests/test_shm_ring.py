"""The shared-memory ring: round trips, wrap-around, back-pressure, out-of-order release, many producers."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import queue
import random
import stat
import threading
import time

import numpy as np
import pytest

from embedserve.ipc.shm_ring import RingCorruptRef, RingFullTimeout, ShmRing


@pytest.fixture
def make_ring(tmp_path):
    """Factory for rings in a private temp dir, closed and unlinked after the test."""
    rings = []

    def make(capacity: int = 64 * 1024) -> ShmRing:
        ring = ShmRing.create(str(tmp_path / f"ring{len(rings)}"), capacity)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()
        ring.unlink()


def _span(nbytes: int) -> int:
    """Bytes a block of `nbytes` occupies: a 64-byte header plus the payload rounded up to 64."""
    return 64 + (nbytes + 63) // 64 * 64


def test_round_trip_of_several_sizes_and_alignment(make_ring):
    ring = make_ring()
    for size in (0, 1, 7, 63, 64, 65, 1000, 4096, 12345):
        data = os.urandom(size)
        handle = ring.write(data)
        view = ring.view(handle, size)
        assert view.tobytes() == data
        assert view.readonly
        assert np.frombuffer(view, np.uint8).ctypes.data % 64 == 0
        ring.release(handle)
    assert ring.used_bytes() == 0
    ring.check_integrity()


def test_reserve_fills_in_place_through_numpy(make_ring):
    ring = make_ring()
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    handle, dst = ring.reserve(arr.nbytes)
    np.frombuffer(dst, np.float32).reshape(3, 4)[:] = arr
    got = np.frombuffer(ring.view(handle, arr.nbytes), np.float32).reshape(3, 4)
    np.testing.assert_array_equal(got, arr)
    assert ring.write(memoryview(np.arange(5, dtype=np.int32))) > handle  # non-byte formats are bytes too


@pytest.mark.parametrize("how", ["attach", "pickle"])
def test_attach_sees_the_same_blocks(make_ring, how):
    ring = make_ring()
    other = ShmRing.attach(ring.path) if how == "attach" else pickle.loads(pickle.dumps(ring))
    try:
        handle = ring.write(b"shared")
        assert other.capacity == ring.capacity
        assert other.view(handle, 6).tobytes() == b"shared"
        other.release(handle)
        assert ring.used_bytes() == 0
    finally:
        other.close()


def test_wrap_around_many_laps_keeps_payloads(make_ring):
    ring = make_ring(4096)
    rng = random.Random(0)
    live: list[tuple[int, bytes]] = []
    written = 0
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 900))
        while True:
            try:
                live.append((ring.write(data, timeout=0), data))
                break
            except RingFullTimeout:
                handle, expected = live.pop(0)
                assert ring.view(handle, len(expected)).tobytes() == expected
                ring.release(handle)
        written += _span(len(data))
    assert written > 100 * ring.capacity  # many laps
    for handle, expected in live:
        assert ring.view(handle, len(expected)).tobytes() == expected
        ring.release(handle)
    assert ring.used_bytes() == 0
    ring.check_integrity()


def test_max_block_needs_the_whole_ring_and_fits_after_a_wrap(make_ring):
    ring = make_ring(4096)
    ring.release(ring.write(b"x" * 100))  # head is now mid-lap
    handle = ring.write(b"y" * ring.max_block_bytes, timeout=0)
    assert ring.used_bytes() == ring.capacity
    ring.release(handle)
    assert ring.used_bytes() == 0


def test_writer_blocks_while_full_and_resumes_after_release(make_ring):
    ring = make_ring(1024)
    first = ring.write(b"a" * 900)
    done = threading.Event()
    result = []

    def writer() -> None:
        result.append(ring.write(b"b" * 500, timeout=5))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not done.wait(0.1)  # still waiting for room
    ring.release(first)
    thread.join(5)
    assert done.is_set()
    assert ring.view(result[0], 500).tobytes() == b"b" * 500


def test_full_ring_times_out_and_oversized_write_fails_at_once(make_ring):
    ring = make_ring(1024)
    ring.write(b"a" * 900)
    start = time.monotonic()
    with pytest.raises(RingFullTimeout):
        ring.write(b"b" * 500, timeout=0.05)
    assert 0.04 < time.monotonic() - start < 1.0
    start = time.monotonic()
    with pytest.raises(ValueError):
        ring.write(b"c" * (ring.max_block_bytes + 1), timeout=None)
    with pytest.raises(ValueError):
        ring.reserve(-1)
    assert time.monotonic() - start < 0.1


def test_out_of_order_release_reclaims_only_from_the_oldest(make_ring):
    ring = make_ring(4096)
    handles = [ring.write(b"z" * 100) for _ in range(4)]
    full = 4 * _span(100)
    assert ring.used_bytes() == full
    ring.release(handles[2])
    ring.release(handles[1])
    assert ring.used_bytes() == full  # the oldest block still pins the tail
    ring.release(handles[0])
    assert ring.used_bytes() == _span(100)  # blocks 0-2 reclaimed together
    ring.release(handles[3])
    assert ring.used_bytes() == 0
    ring.check_integrity()


def test_double_release_and_bogus_handles_raise(make_ring):
    ring = make_ring(4096)
    keep = ring.write(b"keep")
    handle = ring.write(b"data")
    ring.release(handle)
    with pytest.raises(RingCorruptRef):
        ring.release(handle)  # double release while it still sits above the tail
    ring.release(keep)
    with pytest.raises(RingCorruptRef):
        ring.release(keep)  # ... and once it is below the tail
    live = ring.write(b"live!")
    for bogus in (-64, -1, 1, live + 1, live + 64, live + 10**30, 2**64, 2**70, "0", None, 1.0):
        with pytest.raises(RingCorruptRef):
            ring.view(bogus, 5)
        with pytest.raises(RingCorruptRef):
            ring.release(bogus)
    for bad_size in (0, 4, 6, -5, 2**70, None):
        with pytest.raises(RingCorruptRef):
            ring.view(live, bad_size)
    assert ring.view(live, 5).tobytes() == b"live!"
    ring.check_integrity()


def test_stale_handle_is_refused_after_its_space_is_reused(make_ring):
    ring = make_ring(1024)
    old = ring.write(b"o" * 100)
    ring.release(old)
    new = ring.write(b"n" * 100, timeout=0)
    while new % ring.capacity != old % ring.capacity:  # go round until the same spot is reused
        ring.release(new)
        new = ring.write(b"n" * 100, timeout=0)
    with pytest.raises(RingCorruptRef):
        ring.view(old, 100)
    with pytest.raises(RingCorruptRef):
        ring.release(old)
    assert ring.view(new, 100).tobytes() == b"n" * 100


def test_payload_mimicking_a_block_header_is_not_a_block(make_ring):
    ring = make_ring(4096)
    handle = ring.write(b"p" * 64)
    real_header = ring._buf[64 + handle : 64 + handle + 64].tobytes()  # the ring header comes first
    forged = ring.write(real_header * 4)
    for k in range(1, 5):
        with pytest.raises(RingCorruptRef):
            ring.view(forged + 64 * k, 64)
        with pytest.raises(RingCorruptRef):
            ring.release(forged + 64 * k)
    ring.check_integrity()


def test_create_refuses_existing_path_mode_0600_and_unlink(tmp_path):
    path = str(tmp_path / "ring")
    ring = ShmRing.create(path, 4096)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        ShmRing.create(path, 4096)
    with pytest.raises(ValueError):
        ShmRing.create(str(tmp_path / "tiny"), 100)
    odd = ShmRing.create(str(tmp_path / "odd"), 1000)
    assert odd.capacity == 1024  # rounded up so every block stays 64-byte aligned
    odd.close()
    ring.close()
    ring.close()
    ring.unlink()
    assert not os.path.exists(path)
    ring.unlink()


def test_attach_refuses_a_file_that_is_not_a_ring(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError):
        ShmRing.attach(str(path))


def test_close_with_a_live_view_keeps_the_view_valid(make_ring):
    ring = make_ring()
    view = ring.view(ring.write(b"still here"), 10)
    ring.close()
    assert view.tobytes() == b"still here"


def _write_and_report(ring: ShmRing, out: mp.Queue) -> None:
    ring.write(b"child", timeout=5)
    out.put(time.monotonic())


def test_forked_child_takes_its_own_lock(make_ring):
    """A fork shares the parent's open file and so its flock; the ring must reopen it to exclude."""
    ring = make_ring()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_write_and_report, args=(ring, out), daemon=True)
    try:
        with ring._lock:  # the child's write must wait for this
            child.start()
            time.sleep(0.2)
            released_at = time.monotonic()
        assert out.get(timeout=5) >= released_at
        child.join(5)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert ring.used_bytes() == _span(5)


# ---- many producer processes ---------------------------------------------------------------------

_PRODUCERS, _PER_PRODUCER = 4, 500


def _payload(producer: int, seq: int) -> bytes:
    """A block whose content names its sender and proves its integrity: id, seq, body, digest."""
    rng = random.Random(producer * 1_000_003 + seq)
    body = producer.to_bytes(2, "little") + seq.to_bytes(4, "little") + rng.randbytes(rng.randrange(0, 1500))
    return body + hashlib.blake2b(body, digest_size=16).digest()


def _produce(path: str, producer: int, out: mp.Queue) -> None:
    ring = ShmRing.attach(path)
    for seq in range(_PER_PRODUCER):
        data = _payload(producer, seq)
        if seq % 2:
            handle = ring.write(data, timeout=30)
        else:
            handle, view = ring.reserve(len(data), timeout=30)
            view[:] = data
        out.put((handle, len(data)))
    ring.close()


def _consume(ring: ShmRing, inbox: mp.Queue, total: int, seen: list[tuple[int, int]]) -> None:
    """Verify every block and release them out of order; release all held blocks when idle."""
    rng, held = random.Random(1), []
    deadline = time.monotonic() + 60
    while len(seen) < total:
        assert time.monotonic() < deadline, f"only {len(seen)} of {total} blocks arrived"
        try:
            handle, nbytes = inbox.get(timeout=0.005)
        except queue.Empty:
            for h in held:
                ring.release(h)
            held.clear()
            continue
        data = ring.view(handle, nbytes).tobytes()
        body, digest = data[:-16], data[-16:]
        assert hashlib.blake2b(body, digest_size=16).digest() == digest
        seen.append((int.from_bytes(body[:2], "little"), int.from_bytes(body[2:6], "little")))
        held.append(handle)
        if len(held) > 4:
            ring.release(held.pop(rng.randrange(len(held))))
    for h in held:
        ring.release(h)


def test_many_producer_processes_deliver_every_block_once_intact(make_ring):
    ring = make_ring(16 * 1024)  # small: producers find it full most of the time
    ctx = mp.get_context("spawn")
    inbox = ctx.Queue()
    procs = [ctx.Process(target=_produce, args=(ring.path, p, inbox)) for p in range(_PRODUCERS)]
    for proc in procs:
        proc.start()
    seen: list[tuple[int, int]] = []
    try:
        _consume(ring, inbox, _PRODUCERS * _PER_PRODUCER, seen)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():  # the consumer failed and left it waiting for room
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    assert sorted(seen) == [(p, s) for p in range(_PRODUCERS) for s in range(_PER_PRODUCER)]
    assert ring.used_bytes() == 0
    ring.check_integrity()


def test_many_threads_share_one_ring_object(make_ring):
    ring = make_ring(8 * 1024)
    inbox: queue.Queue = queue.Queue()

    def produce(producer: int) -> None:
        for seq in range(_PER_PRODUCER):
            data = _payload(producer, seq)
            inbox.put((ring.write(data, timeout=30), len(data)))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(_PRODUCERS)]
    for thread in threads:
        thread.start()
    seen: list[tuple[int, int]] = []
    _consume(ring, inbox, _PRODUCERS * _PER_PRODUCER, seen)
    for thread in threads:
        thread.join(30)
    assert len(set(seen)) == len(seen) == _PRODUCERS * _PER_PRODUCER
    assert ring.used_bytes() == 0
