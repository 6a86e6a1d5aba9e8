"""Where the processes meet: ZMQ socket addresses and shared-memory ring files, named in one place.

Every ZMQ endpoint is an `ipc://` socket inside a private (0700) directory, so only this user's
processes can connect; nothing listens on TCP but the HTTP server.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
SHM_PREFIX = "embedserve-"
IPC_PREFIX = "embedserve-ipc-"  # then the launcher's pid, for people reading /tmp
# NOTE: a Unix socket's path fits in 108 bytes with its NUL; a long TMPDIR (CI runners, HPC jobs)
# would otherwise fail ZMQ's bind in a child after the model had loaded.
SOCKET_PATH_MAX = 107
FALLBACK_SOCKET_ROOT = "/tmp"
LOCK_NAME = "launcher.lock"  # locked by the launcher while it lives: a later launch can tell it is gone
_held_locks: dict[str, int] = {}  # this launcher's socket directory -> its locked descriptor


@dataclass(frozen=True)
class PortArgs:
    ipc_dir: str  # private directory holding every socket file
    tokenizer_addr: str  # http -> tokenizer
    scheduler_addr: str  # tokenizer, executor -> scheduler
    executor_addr: str  # scheduler -> executor
    detokenizer_addr: str  # executor -> detokenizer
    http_addr: str  # tokenizer, detokenizer, launcher -> http
    token_ring: str  # file of the ring carrying token ids (tokenizer -> scheduler/executor)
    embedding_ring: str  # file of the ring carrying embeddings (executor -> detokenizer)
    response_ring: str  # file of the ring carrying encoded response bodies (detokenizer -> http)

    @classmethod
    def create(cls) -> PortArgs:
        ipc_dir = tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-", dir=socket_root())
        os.chmod(ipc_dir, 0o700)
        lock = os.open(os.path.join(ipc_dir, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # NOTE: the kernel drops it when we die, even by kill -9
        _held_locks[ipc_dir] = lock
        shm_base = _shm_base(ipc_dir)

        def sock(name: str) -> str:
            return f"ipc://{os.path.join(ipc_dir, name)}"

        return cls(
            ipc_dir=ipc_dir,
            tokenizer_addr=sock("tokenizer"),
            scheduler_addr=sock("scheduler"),
            executor_addr=sock("executor"),
            detokenizer_addr=sock("detokenizer"),
            http_addr=sock("http"),
            token_ring=f"{shm_base}tokens",
            embedding_ring=f"{shm_base}embeddings",
            response_ring=f"{shm_base}responses",
        )

    @property
    def ring_paths(self) -> tuple[str, ...]:
        return (self.token_ring, self.embedding_ring, self.response_ring)

    def remove_all(self) -> None:
        """Delete every ring file and the socket directory; safe to call twice."""
        for path in self.ring_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
        lock = _held_locks.pop(self.ipc_dir, None)
        if lock is not None:
            os.close(lock)


def _shm_base(ipc_dir: str) -> str:
    """Ring files go to /dev/shm (RAM) when it exists, named after the launcher's pid for stale-file cleanup."""
    tag = os.path.basename(ipc_dir).removeprefix("embedserve-ipc-")
    folder = SHM_DIR if os.path.isdir(SHM_DIR) else ipc_dir
    return os.path.join(folder, f"{SHM_PREFIX}{os.getpid()}-{tag}-")


def remove_stale_rings() -> list[str]:
    """Remove ring files left by launchers that no longer run (e.g. a launcher killed with -9)."""
    removed = []
    if not os.path.isdir(SHM_DIR):
        return removed
    for name in os.listdir(SHM_DIR):
        if not name.startswith(SHM_PREFIX):
            continue
        pid_text = name[len(SHM_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def socket_root() -> str:
    """The temporary folder, unless its socket paths would be too long for a Unix socket."""
    root = tempfile.gettempdir()
    longest = os.path.join(root, f"{IPC_PREFIX}{os.getpid()}-{'x' * 8}", "detokenizer")  # mkdtemp adds 8
    return root if len(longest.encode()) <= SOCKET_PATH_MAX else FALLBACK_SOCKET_ROOT


def remove_stale_ipc_dirs(root: str | None = None) -> list[str]:
    """Remove this user's socket directories whose launcher no longer runs (killed with -9): their
    lock is free. A pid would not do: a launcher in another container sharing /tmp has a pid this
    one cannot see. A directory without a lock (older, or just being made) is left alone."""
    root = root or socket_root()
    removed = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(IPC_PREFIX) and path not in _held_locks and _lock_is_free(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _lock_is_free(folder: str) -> bool:
    try:
        if os.stat(folder).st_uid != os.getuid():
            return False
        lock = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(lock)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
