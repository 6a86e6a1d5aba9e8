"""HeapTrimmer: trims when RSS stands `growth` above the working set, and once after `idle_s` of quiet.

(Why not after every batch: see embedserve/ipc/heap.py — measured, the page faults cost the executor
15 % of a core under load.)
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from embedserve.ipc import heap
from embedserve.ipc.heap import HeapTrimmer


def test_busy_work_trims_only_past_the_growth_band(monkeypatch):
    rss = [100]
    monkeypatch.setattr(heap, "resident_bytes", lambda: rss[0])
    trimmer = HeapTrimmer(growth=50, idle_s=60)
    for level in (100, 140, 90, 150, 120):  # batches of varying size within the band: no trim
        rss[0] = level
        trimmer.after_work()
    assert trimmer.trims == 0
    rss[0] = 151  # the heap crept past working set + growth
    trimmer.after_work()
    assert trimmer.trims == 1
    rss[0] = 60  # the first batch after a trim sets the new working set...
    trimmer.after_work()
    rss[0] = 105
    trimmer.after_work()
    assert trimmer.trims == 1
    rss[0] = 111  # ...and the band is measured from it
    trimmer.after_work()
    assert trimmer.trims == 2


def test_a_quiet_process_trims_once_then_blocks_freely():
    trimmer = HeapTrimmer(growth=1 << 40, idle_s=0.05)
    assert trimmer.idle_timeout_ms() is None  # nothing done yet: nothing to give back
    trimmer.after_work()
    assert trimmer.trims == 0
    wait = trimmer.idle_timeout_ms()
    assert wait is not None and 0 <= wait <= 50
    trimmer.on_idle()  # too early: still within idle_s of the work
    assert trimmer.trims == 0
    time.sleep(0.06)
    assert trimmer.idle_timeout_ms() == 0
    trimmer.on_idle()
    assert trimmer.trims == 1
    assert trimmer.idle_timeout_ms() is None
    trimmer.on_idle()
    assert trimmer.trims == 1  # no second trim without new work


GROWN_HEAP = """
import ctypes, ctypes.util, os
from embedserve.ipc.heap import HeapTrimmer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: keep the blocks on the heap, as large tensors end up
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() alone must not give the memory back
blocks = [libc.malloc(1 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
for b in blocks[:-1]:  # the last block keeps the heap's top in place: only holes are left
    libc.free(b)
before = rss()
trimmer = HeapTrimmer(idle_s=60)
trimmer.trim()
print(trimmer.trims, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc: Linux")
def test_a_heap_that_grew_is_handed_back():
    """The effect, not the bookkeeping: freed heap holes leave RSS at a trim (in a child process, so
    the malloc settings it needs stay out of the test session)."""
    done = subprocess.run([sys.executable, "-c", GROWN_HEAP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    trims, released = map(int, done.stdout.split())
    assert trims == 1
    assert released > 32 << 20


class _QuietInbox:
    """An inbox with nothing in it for `empty` calls, then one message; records each timeout."""

    def __init__(self, empty: int):
        self.empty, self.timeouts = empty, []

    def recv(self, timeout_ms):
        self.timeouts.append(timeout_ms)
        if len(self.timeouts) <= self.empty:
            return None
        return "message"


def test_no_idle_trim_while_work_runs_elsewhere_and_the_wait_looks_again_soon():
    trimmer = HeapTrimmer(growth=1 << 40, idle_s=0)
    trimmer.after_work()  # due for an idle trim at once...
    inbox = _QuietInbox(empty=3)
    assert trimmer.next_message(inbox, busy=lambda: True) == "message"
    assert trimmer.trims == 0  # ...but the lanes were busy all along
    assert all(t == heap.BUSY_POLL_MS for t in inbox.timeouts)
    assert trimmer.next_message(_QuietInbox(empty=1), busy=lambda: False) == "message"
    assert trimmer.trims == 1  # idle now: trimmed once
