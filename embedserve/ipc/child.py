"""What every child process does the same way: its title, dying with the launcher, reporting to it.

Each process module ends in `run_<name>_process(server_args, port_args, channel)`, which wraps its
body in `child_process(...)`. The launcher learns "ready", "error" and other events through a
one-way pipe carrying small JSON objects (never pickle).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import setproctitle

from embedserve.log import configure_logging
from embedserve.startup_error import StartupError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class LauncherChannel:
    """The child's end of its pipe to the launcher."""

    def __init__(self, conn: Connection):
        self._conn = conn

    def send(self, event: str, **data: Any) -> None:
        try:
            self._conn.send_bytes(msgspec.json.encode({"event": event, **data}))
        except (BrokenPipeError, OSError):
            pass  # the launcher is gone; PDEATHSIG ends us shortly

    def ready(self, **info: Any) -> None:
        """Tells the launcher this process serves; what start-up built is frozen out of the collector.

        NOTE: imports, the app and the model live as long as the process. Left to the collector,
        every full pass walks them all: under load the HTTP process's took 33 ms, stalling every
        request in flight. Frozen, a pass walks only what serving allocates.
        """
        gc.collect()
        gc.freeze()
        self.send("ready", **info)


def read_event(conn: Connection) -> dict[str, Any]:
    """The launcher's side: decode one event sent by `LauncherChannel.send`."""
    return msgspec.json.decode(conn.recv_bytes())


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the launcher dies, so no child outlives it (even after kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def child_process(name: str, log_level: str, conn: Connection) -> Iterator[LauncherChannel]:
    """Set up a child; on any exception log it, tell the launcher, and exit non-zero."""
    setproctitle.setproctitle(f"embedserve::{name}")
    _die_with_parent()
    # NOTE: Ctrl+C, and SIGHUP from a closed terminal, reach the whole process group; only the
    # launcher decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(log_level)
    channel = LauncherChannel(conn)
    try:
        yield channel
    except Exception as exc:
        if not isinstance(exc, StartupError):  # NOTE: the launcher logs a StartupError's message
            logger.error("embedserve::%s failed:\n%s", name, traceback.format_exc())
        channel.send("error", message=f"{type(exc).__name__}: {exc}")
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
