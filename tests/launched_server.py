"""Start a real server in a subprocess, as a user would, and take it down again."""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

READY_LINE = "The server is fired up and ready to roll!"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    def __init__(self, *extra_args: str, timeout: float = 180.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="embedserve-test-")) / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "embedserve.launch", "--port", str(self.port), *extra_args]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self._wait_ready(timeout)
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines_with(self, fragment: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """The log's lines holding `fragment`, once there are `count` of them (or `timeout` passed):
        the server writes some lines just after the client has its answer."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log().splitlines() if fragment in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def child(self, title: str) -> psutil.Process:
        """The child process whose title is `embedserve::<title>`."""
        for proc in self.children:
            if proc.cmdline() and proc.cmdline()[0] == f"embedserve::{title}":
                return proc
        raise LookupError(title)

    @property
    def ipc_dir(self) -> str:
        return re.search(r"IPC sockets in (\S+)", self.log()).group(1)

    def shm_segments(self) -> list[str]:
        return glob.glob(f"/dev/shm/embedserve-{self.proc.pid}-*")

    def post(self, path: str, payload: object, **kw) -> requests.Response:
        return requests.post(self.url + path, json=payload, **{"timeout": 60, **kw})

    def metric_sum(self, name: str) -> float:
        """The metric's value summed over its label sets, from /metrics."""
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def kill_strays(self) -> None:
        """Never leave processes behind, whatever a test found (call after asserting on them)."""
        for proc in self.children:
            if proc.is_running():
                proc.kill()

    def __enter__(self) -> LaunchedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill_strays()
