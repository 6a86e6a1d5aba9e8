"""A launcher killed with -9 leaves its socket directory; the next launch removes it, and only it."""

from __future__ import annotations

import os
import subprocess
import sys

from embedserve.ipc.ports import IPC_PREFIX, PortArgs, remove_stale_ipc_dirs


def test_only_directories_of_dead_launchers_are_removed(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    stale = tmp_path / f"{IPC_PREFIX}{dead_pid}-abc123"
    live = tmp_path / f"{IPC_PREFIX}{os.getpid()}-def456"
    legacy = tmp_path / f"{IPC_PREFIX}xyz789"  # no pid in its name: nothing tells whose it is
    for folder in (stale, live, legacy):
        folder.mkdir()
        (folder / "tokenizer").write_text("")
    assert remove_stale_ipc_dirs(str(tmp_path)) == [stale.name]
    assert not stale.exists() and live.exists() and legacy.exists()


def test_a_launchers_directory_names_its_pid():
    ports = PortArgs.create()
    try:
        assert os.path.basename(ports.ipc_dir).startswith(f"{IPC_PREFIX}{os.getpid()}-")
    finally:
        ports.remove_all()
