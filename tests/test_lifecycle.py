"""Start, stop and crash: every process and shared-memory segment goes away, and the exit code says why."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests
from launched_server import LaunchedServer, free_port

pytestmark = pytest.mark.slow

TITLES = ("http", "tokenizer", "scheduler", "executor", "detokenizer")


def assert_all_gone(server: LaunchedServer, ipc_dir: str) -> None:
    _, alive = psutil.wait_procs(server.children, timeout=5)
    server.kill_strays()
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    assert server.shm_segments() == []
    assert not os.path.exists(ipc_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_process_and_removes_segments(sig, launch):
    server = launch()
    titles = sorted(p.cmdline()[0] for p in server.children if p.cmdline()[0].startswith("embedserve::"))
    assert titles == sorted(f"embedserve::{t}" for t in TITLES)
    ipc_dir = server.ipc_dir
    assert oct(os.stat(ipc_dir).st_mode & 0o777) == "0o700"
    assert len(server.shm_segments()) == 3
    started = time.monotonic()
    assert server.stop(sig) == 0
    assert time.monotonic() - started < 10
    assert_all_gone(server, ipc_dir)


def test_sighup_to_the_whole_group_drains_and_stops_like_sigterm(launch):
    """Closing the terminal sends SIGHUP to every process of the group, children included."""
    server = launch()
    ipc_dir = server.ipc_dir
    for pid in [server.proc.pid, *(child.pid for child in server.children)]:
        os.kill(pid, signal.SIGHUP)
    assert server.proc.wait(15) == 0
    assert "Received SIGHUP; draining in-flight requests." in server.log()
    assert "All embedserve processes stopped" in server.log()
    assert_all_gone(server, ipc_dir)


@pytest.mark.parametrize("victim", TITLES)
def test_killed_child_takes_the_server_down(victim, launch):
    server = launch()
    ipc_dir = server.ipc_dir
    server.child(victim).kill()
    started = time.monotonic()
    code = server.proc.wait(15)
    assert time.monotonic() - started < 10
    assert code != 0
    assert f"embedserve::{victim}" in server.log() and "SIGKILL" in server.log()
    server.stop()
    assert_all_gone(server, ipc_dir)


def test_api_key_guards_everything_but_health():
    with LaunchedServer("--api-key", "s3cret") as server:
        assert requests.get(f"{server.url}/health").status_code == 200
        denied = server.post("/v1/embeddings", {"input": "hi"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = server.post("/v1/embeddings", {"input": "hi"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert requests.get(f"{server.url}/v1/models").status_code == 401
        ok = server.post("/v1/embeddings", {"input": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (
            requests.get(f"{server.url}/get_server_info", headers={"Authorization": "Bearer s3cret"}).json()[
                "api_key"
            ]
            == "***"
        )
        key = {"Authorization": "Bearer s3cret"}
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert requests.get(f"{server.url}{path}").status_code == 401, path
            assert requests.get(f"{server.url}{path}", headers=key).status_code == 200, path
        assert "/v1/embeddings" in requests.get(f"{server.url}/openapi.json", headers=key).json()["paths"]
        assert requests.head(f"{server.url}/v1/models").status_code == 401
        assert requests.head(f"{server.url}/v1/models", headers=key).status_code == 200
        assert requests.get(f"{server.url}/metrics").status_code == 200
        assert "s3cret" not in server.log() and "api_key='***'" in server.log()


def test_port_in_use_fails_fast_with_a_clear_message():
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "embedserve.launch", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "--port" in result.stderr


def test_missing_model_folder_fails_fast():
    result = subprocess.run(
        [sys.executable, "-m", "embedserve.launch", "--model-path", "/nonexistent/model"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "/nonexistent/model" in result.stderr


def test_a_checkpoint_that_does_not_fit_is_one_line_without_a_traceback():
    override = '{"max_position_embeddings": 1024}'  # BERT's position table has 512 rows
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve.launch",
            "--port",
            str(free_port()),
            "--json-model-override-args",
            override,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "embedserve::executor" in result.stderr and "WeightLoadError" in result.stderr
    assert "(512, 384) in the checkpoint" in result.stderr and "Traceback" not in result.stderr
