"""A child's "ready" to the launcher (ipc/child.py): the event arrives, and what start-up built is
frozen out of the garbage collector's full passes."""

from __future__ import annotations

import gc
from multiprocessing import Pipe

from embedserve.ipc.child import LauncherChannel, read_event


def test_ready_reaches_the_launcher_and_freezes_what_start_up_built():
    theirs, ours = Pipe(duplex=False)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        LauncherChannel(ours).ready(kv_pool_tokens=7)
        assert read_event(theirs) == {"event": "ready", "kv_pool_tokens": 7}
        assert gc.get_freeze_count() > 1000  # this test process's modules, at the least
    finally:
        gc.unfreeze()  # NOTE: give pytest's own objects back to the collector
