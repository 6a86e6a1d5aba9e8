"""The launcher's wait for the warm-up request ends as soon as a child dies or a stop signal comes,
not after the request's own five-minute timeout (a scheduler that crashed on the warm-up batch once
left the launcher deaf to SIGTERM for that long)."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time

import pytest

from embedserve.launch_support import Child, ChildFailed, Supervisor
from embedserve.server_args import ServerArgs


@pytest.fixture
def supervisor():
    ctx = mp.get_context("spawn")
    sup = Supervisor(ServerArgs(), None, ctx)  # type: ignore[arg-type]
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=time.sleep, args=(1.0,))
    child.start()
    writer.close()
    sup.children["scheduler"] = Child("scheduler", child, reader)
    yield sup
    child.join(5)


def test_a_child_dying_during_the_warm_up_ends_the_wait(supervisor):
    started = time.monotonic()
    with pytest.raises(ChildFailed, match=r"embedserve::scheduler \(pid \d+\) exited with code 0"):
        supervisor.watch(lambda: time.sleep(60))
    assert time.monotonic() - started < 30


def test_sigterm_during_the_warm_up_ends_the_wait(supervisor):
    threading.Timer(0.2, supervisor._on_signal, args=(signal.SIGTERM, None)).start()
    with pytest.raises(KeyboardInterrupt):
        supervisor.watch(lambda: time.sleep(60))
    assert supervisor.stop_signal == signal.SIGTERM


def test_the_warm_ups_own_outcome_comes_back(supervisor):
    supervisor.watch(lambda: None)
    with pytest.raises(ChildFailed, match="warm-up request failed"):
        supervisor.watch(lambda: (_ for _ in ()).throw(ChildFailed("The warm-up request failed: 400")))
