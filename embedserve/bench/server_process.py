"""Start a server as a child process group, wait until /health says 200, and always stop it.

Used by `embedserve bench --vs-vllm` and the side-by-side scripts in bench/: a server under test is
never left running, and what it leaves in its process group is reaped before the next phase.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    # NOTE: the port is free when we look; another process could take it before the server binds,
    # which then shows up as a start-up failure in the server log, not a silent wrong result.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, model_path: str, dtype: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "embedserve.launch",
        "--port",
        str(port),
        "--model-path",
        model_path,
        "--dtype",
        dtype,
    ]


@contextmanager
def running_server(
    cmd: list[str],
    port: int,
    log_path: Path,
    ready_timeout: float,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Starts the server, yields its base URL once /health says 200, and always stops it."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        # start_new_session: the server and its children form one process group we can clean up.
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_healthy(url, proc, log_path, ready_timeout)
            yield url
        finally:
            _stop(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode} before it was ready:\n{_tail(log_path)}"
            )
        try:
            if httpx.get(url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM and wait; SIGKILL the server's own process group only if it will not go. A Ctrl-C
    while waiting kills the group at once (it is in its own session: the terminal's Ctrl-C never
    reaches it) and goes on as a KeyboardInterrupt."""
    try:
        if proc.poll() is None:
            _terminate(proc, grace)
        if proc.returncode != 0:
            print(f"server exited with {proc.returncode}", file=sys.stderr)
        _reap_group(proc.pid)
    except KeyboardInterrupt:
        _kill_group(proc.pid)
        proc.wait()
        raise


def _terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM; after 2 s say that we wait, after `grace` SIGKILL the process group."""
    proc.send_signal(signal.SIGTERM)
    if _exits_within(proc, min(grace, 2.0)):
        return
    print(f"waiting for the server (pid {proc.pid}) to stop; Ctrl-C kills it", file=sys.stderr)
    if _exits_within(proc, max(grace - 2.0, 0.0)):
        return
    print(f"server ignored SIGTERM for {grace:.0f} s; killing its process group", file=sys.stderr)
    _kill_group(proc.pid)
    proc.wait()


def _exits_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_group(pgid: int, grace: float = 10.0) -> None:
    """Waits for what the server left in its group to go; kills it only after `grace` seconds.

    NOTE: multiprocessing's resource tracker outlives the launcher by a moment to free shared
    memory; killing it at once would leak the rings. Children still alive later would steal the
    cores from the next phase of a benchmark, so those are killed.
    """
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    print(f"server's processes outlived it by {grace:.0f} s; killing its process group", file=sys.stderr)
    _kill_group(pgid)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
