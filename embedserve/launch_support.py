"""The launcher's machinery: starting children, waiting for them, watching them, stopping them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess

import zmq

from embedserve.detok_proc.response_builder import max_body_bytes
from embedserve.http.validation import MAX_INPUTS
from embedserve.ipc.child import read_event
from embedserve.ipc.ports import PortArgs
from embedserve.ipc.shm_ring import ShmRing
from embedserve.ipc.zmq_queue import ZmqPush
from embedserve.messages import ServerState
from embedserve.model_config import ModelConfig
from embedserve.server_args import ServerArgs

logger = logging.getLogger("embedserve")

MiB = 1024 * 1024
STOP_GRACE_SECONDS = 3.0  # after SIGTERM, before SIGKILL
ABANDON_GRACE_SECONDS = 0.5  # for the HTTP process to send its 503s when a process died


class ChildFailed(RuntimeError):
    """A child process reported an error or died; the message says which and why."""


@dataclass
class Child:
    name: str
    process: SpawnProcess
    conn: Connection  # the launcher's read end of the child's event pipe
    last_error: str | None = None


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host") from exc
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from exc


def create_rings(ports: PortArgs, model: ModelConfig, args: ServerArgs) -> list[ShmRing]:
    """The three rings, sized so the largest legal request fits; pages are only touched when used."""
    batch_bytes = args.running_request_budget * model.hidden_size * 4
    response_bytes = max_body_bytes(MAX_INPUTS, model.hidden_size)
    return [
        ShmRing.create(ports.token_ring, 64 * MiB),
        ShmRing.create(ports.embedding_ring, max(32 * MiB, 8 * batch_bytes)),
        ShmRing.create(ports.response_ring, max(64 * MiB, 2 * response_bytes + MiB)),
    ]


def with_kv_pool(args: ServerArgs, model: ModelConfig, kv_pool_tokens: int) -> ServerArgs:
    """The args every later process gets: the pool the executor allocated (0: none), and a context
    length that fits in it (an input must hold all its KV slots at once)."""
    context = args.context_length or model.context_length
    if kv_pool_tokens and context > kv_pool_tokens:
        logger.warning(
            f"context_len lowered from {context} to the KV pool's {kv_pool_tokens} tokens "
            "(raise --max-total-tokens for longer inputs)"
        )
        context = kv_pool_tokens
    return dataclasses.replace(
        args,
        max_total_tokens=kv_pool_tokens,
        context_length=context if context != model.context_length else args.context_length,
    )


def local_url(args: ServerArgs, path: str) -> str:
    """The server's own address as the launcher reaches it: a wildcard bind is asked on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{args.port}{path}"


def warm_up(args: ServerArgs, timeout: float = 300.0) -> None:
    """One request through HTTP, tokenizer, scheduler, executor and output, as the seed's server does."""
    url = local_url(args, "/encode")
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    body = json.dumps({"text": "The server is warming up."}).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.loads(response.read())
    except Exception as exc:
        raise ChildFailed(f"The warm-up request failed: {exc}") from exc


class Supervisor:
    def __init__(self, args: ServerArgs, ports: PortArgs, ctx: SpawnContext):
        self.args = args
        self.ports = ports
        self.ctx = ctx
        self.children: dict[str, Child] = {}
        self.stop_signal: int | None = None
        self.force_stop = False  # a second signal: skip the drain
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # ---- signals -----------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        # NOTE: closing the terminal that runs the server sends SIGHUP: stop as for SIGTERM, drained.
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.force_stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ---- start-up ----------------------------------------------------------------
    def start(self, name: str, target: Callable) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=target, args=(self.args, self.ports, writer), name=f"embedserve::{name}"
        )
        process.start()
        writer.close()
        self.children[name] = Child(name, process, reader)

    def wait_ready(self, names: list[str]) -> dict[str, dict]:
        """Block until every named child reported ready; returns what each reported."""
        reported: dict[str, dict] = {}
        pending = {self.children[n].conn: self.children[n] for n in names}
        sentinels = {self.children[n].process.sentinel: self.children[n] for n in names}
        while pending:
            for item in wait([*pending, *sentinels, self._wake_r]):
                if item == self._wake_r:
                    raise KeyboardInterrupt
                if item in sentinels:
                    raise ChildFailed(self._death_report(sentinels[item]))
                child = pending[item]
                event = self._read(child)
                if event.get("event") == "ready":
                    reported[child.name] = event
                    del pending[item]
                elif event.get("event") == "error":
                    child.process.join(5)
                    raise ChildFailed(self._death_report(child))
        return reported

    def watch(self, work: Callable[[], None]) -> None:
        """Run `work` (the warm-up request) while watching the children and the stop signals: a
        child that dies meanwhile, or SIGTERM/SIGINT, ends the wait at once instead of after the
        request's own timeout."""
        outcome: list[BaseException | None] = []
        # NOTE: its own pipe, whose writing end only the thread closes: the thread may outlive this
        # call (a child died first), and must never write to a descriptor closed and reused since.
        done_r, done_w = mp.Pipe(duplex=False)

        def run() -> None:
            try:
                work()
                outcome.append(None)
            except BaseException as exc:  # NOTE: handed to the launcher's thread below
                outcome.append(exc)
            with contextlib.suppress(OSError):
                done_w.send_bytes(b"done")
            done_w.close()

        threading.Thread(target=run, name="warm-up", daemon=True).start()
        sentinels = {c.process.sentinel: c for c in self.children.values()}
        try:
            while not outcome:
                for item in wait([*sentinels, self._wake_r, done_r]):
                    if item in sentinels:
                        raise ChildFailed(self._death_report(sentinels[item]))
                    if item == self._wake_r:
                        os.read(self._wake_r, 64)
                        if self.stop_signal is not None:
                            raise KeyboardInterrupt
        finally:
            done_r.close()
        if outcome[0] is not None:
            raise outcome[0]

    def announce_ready(self) -> None:
        self._tell_http(ServerState(ready=True))
        self._await_health(200)

    # ---- running -----------------------------------------------------------------
    def supervise(self) -> int:
        """Block until a signal (returns 0 after a drain) or a child's death (returns 1)."""
        by_sentinel = {c.process.sentinel: c for c in self.children.values()}
        while self.stop_signal is None:
            ready = wait([*by_sentinel, self._wake_r])
            dead = [by_sentinel[s] for s in ready if s in by_sentinel]
            if dead and self.stop_signal is None:
                for child in dead:
                    logger.error(self._death_report(child))
                self._abandon_in_flight(", ".join(f"embedserve::{c.name} died" for c in dead))
                return 1
        logger.info(f"Received {signal.Signals(self.stop_signal).name}; draining in-flight requests.")
        self._drain()
        return 0

    def _abandon_in_flight(self, reason: str) -> None:
        """Have the HTTP process answer what is in flight with 503 before everything stops."""
        http = self.children.get("http")
        if http is None or not http.process.is_alive():
            return
        self._tell_http(ServerState(ready=False, draining=True, abandon=reason))
        time.sleep(ABANDON_GRACE_SECONDS)

    def _drain(self) -> None:
        http = self.children.get("http")
        if http is None or not http.process.is_alive():
            return
        self._tell_http(ServerState(ready=False, draining=True))
        deadline = time.monotonic() + self.args.shutdown_timeout + 2.0  # NOTE: HTTP then sends its 503s
        while time.monotonic() < deadline and http.process.is_alive() and not self.force_stop:
            if http.conn.poll(0.05) and self._read(http).get("event") == "drained":
                return

    # ---- stopping ----------------------------------------------------------------
    def stop_all(self) -> None:
        """SIGTERM every child, SIGKILL whoever is still there after the grace period, reap all."""
        # NOTE: cleanup takes seconds at most and must not be cut short by an impatient Ctrl+C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        alive = [c.process for c in self.children.values() if c.process.is_alive()]
        for process in alive:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in alive:
            if process.is_alive():
                _signal(process, signal.SIGKILL)
                process.join(2)
        for child in self.children.values():
            child.conn.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        logger.info("All embedserve processes stopped.")

    # ---- helpers -----------------------------------------------------------------
    def _read(self, child: Child) -> dict:
        try:
            event = read_event(child.conn)
        except (EOFError, OSError):
            return {}
        if event.get("event") == "error":
            child.last_error = str(event.get("message"))
        return event

    def _death_report(self, child: Child) -> str:
        while child.conn.poll(0):  # pick up an error report sent just before dying
            if not self._read(child):
                break
        child.process.join(1)
        code = child.process.exitcode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited with code {code}"
        )
        reason = f": {child.last_error}" if child.last_error else ""
        return f"embedserve::{child.name} (pid {child.process.pid}) {how}{reason}. Stopping the server."

    def _tell_http(self, state: ServerState) -> None:
        ctx = zmq.Context()
        push: ZmqPush[ServerState] = ZmqPush(ctx, self.ports.http_addr)
        push.send(state)
        push.sock.close(linger=1000)  # let the message leave before the socket goes
        ctx.term()

    def _await_health(self, status: int, timeout: float = 10.0) -> None:
        url = local_url(self.args, "/health")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == status:
                        return
            except Exception:
                pass
            time.sleep(0.05)


def _signal(process: SpawnProcess, signum: int) -> None:
    try:
        if process.pid is not None:
            os.kill(process.pid, signum)
    except ProcessLookupError:
        pass
