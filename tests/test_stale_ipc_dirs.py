"""A launcher killed with -9 leaves its socket directory; the next launch removes it, and only it:
a directory whose launcher lives (its lock held, by a process this one may not even see) stays."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from embedserve.ipc.ports import IPC_PREFIX, LOCK_NAME, PortArgs, remove_stale_ipc_dirs

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_only_directories_whose_lock_is_free_are_removed(tmp_path):
    stale, live, unlocked = (tmp_path / f"{IPC_PREFIX}{n}" for n in ("1-abc", "2-def", "legacy"))
    for folder in (stale, live, unlocked):
        folder.mkdir()
        (folder / "tokenizer").write_text("")
    (stale / LOCK_NAME).write_text("")
    (live / LOCK_NAME).write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(live / LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_ipc_dirs(str(tmp_path)) == [stale.name]
        assert not stale.exists() and live.exists() and unlocked.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_ipc_dirs(str(tmp_path)) == [live.name]  # its launcher is gone now


def test_a_launcher_holds_its_directorys_lock_until_it_removes_it():
    ports = PortArgs.create()
    try:
        assert os.path.basename(ports.ipc_dir).startswith(f"{IPC_PREFIX}{os.getpid()}-")
        other = os.open(os.path.join(ports.ipc_dir, LOCK_NAME), os.O_RDWR)
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked_by_launcher = False
            except BlockingIOError:
                locked_by_launcher = True
        finally:
            os.close(other)
        assert locked_by_launcher
        assert ports.ipc_dir not in [
            os.path.join(os.path.dirname(ports.ipc_dir), n) for n in remove_stale_ipc_dirs()
        ]
    finally:
        ports.remove_all()
    assert not os.path.exists(ports.ipc_dir)


def test_a_temporary_folder_too_long_for_socket_paths_is_passed_over(tmp_path, monkeypatch):
    import tempfile

    import zmq

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    ports = PortArgs.create()
    try:
        assert not ports.ipc_dir.startswith(str(deep))
        with zmq.Context() as ctx, ctx.socket(zmq.PULL) as sock:
            sock.bind(ports.detokenizer_addr)  # NOTE: the longest name; a path past 107 bytes fails
    finally:
        ports.remove_all()
