"""What five message hops cost, ZMQ against plain Unix sockets: the pipeline's transport alone.

    python -m bench.ipc_hops [--messages 200] [--rounds 3] [--gaps-ms 0,100] [--cpus 1]

Five processes in a ring, like the server's HTTP -> tokenizer -> scheduler -> executor -> output ->
HTTP: this process sends a 200-byte message to the first stage, each stage passes it on, and the
time until it is back is five hops. Each round measures both transports, one after the other:

    zmq    PUSH/PULL over ipc://, as embedserve's processes talk (`ipc/zmq_queue.py`); every hop
           wakes three threads: the sender's ZMQ I/O thread, the receiver's I/O thread, the receiver
    unix   AF_UNIX SOCK_SEQPACKET, each stage blocked in recv(): every hop wakes one thread

A gap of 0 sends the next message as soon as the last is back; 100 ms is a query now and then, after
the machine has gone idle (on a VM, its vCPUs halt). `--cpus 1` pins the whole ring to CPU 1 (one
vCPU: wake-ups without an inter-processor interrupt). Nothing here is the server: it isolates what
the transport costs, so a change of transport can be judged before it is built.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import zmq

from embedserve.bench.one_at_a_time import one_at_a_time

STAGES = 5
MESSAGE = b"x" * 200
STOP = b"stop"


def zmq_stage(index: int, folder: str) -> None:
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(f"ipc://{folder}/zmq{index}")
    onward = ctx.socket(zmq.PUSH)
    onward.connect(f"ipc://{folder}/zmq{(index + 1) % STAGES}")
    while True:
        msg = inbox.recv()
        onward.send(msg)
        if msg == STOP:
            break
    inbox.close(linger=0)
    onward.close(linger=1000)  # NOTE: the stop must reach the next stage before this one goes
    ctx.term()


def unix_listener(folder: str, index: int) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(f"{folder}/unix{index}")
    listener.listen(1)
    return listener


def unix_connect(folder: str, index: int) -> socket.socket:
    """Connects to stage `index`, waiting for it to listen (stages start in any order)."""
    out = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    while True:
        try:
            out.connect(f"{folder}/unix{index}")
            return out
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)


def unix_stage(index: int, folder: str) -> None:
    listener = unix_listener(folder, index)
    onward = unix_connect(folder, (index + 1) % STAGES)
    inbox, _ = listener.accept()
    while True:
        msg = inbox.recv(65536)
        onward.send(msg)
        if msg == STOP:
            break


def ring(kind: str, folder: str) -> tuple[Callable[[bytes], object], Callable[[], bytes], Callable[[], None]]:
    """This process as stage 0: send, receive and close for the given transport."""
    if kind == "zmq":
        ctx = zmq.Context()
        inbox = ctx.socket(zmq.PULL)
        inbox.bind(f"ipc://{folder}/zmq0")
        onward = ctx.socket(zmq.PUSH)
        onward.connect(f"ipc://{folder}/zmq1")
        return onward.send, inbox.recv, lambda: (onward.close(0), inbox.close(0), ctx.term())
    listener = unix_listener(folder, 0)
    onward = unix_connect(folder, 1)
    inbox, _ = listener.accept()
    return onward.send, lambda: inbox.recv(65536), lambda: (onward.close(), inbox.close(), listener.close())


def five_hops_us(kind: str, gaps_ms: list[float], messages: int) -> dict[float, float]:
    """Median microseconds for a message to go round the ring, per gap."""
    folder = tempfile.mkdtemp(prefix="embedserve-ipc-hops-")
    target = zmq_stage if kind == "zmq" else unix_stage
    stages = [mp.get_context("spawn").Process(target=target, args=(i, folder)) for i in range(1, STAGES)]
    for stage in stages:
        stage.start()
    send, recv, close = ring(kind, folder)
    round_trip = lambda: (send(MESSAGE), recv())  # noqa: E731
    # NOTE: the warm-up: every connection made and every stage warm before timing
    out = {
        gap: statistics.median(one_at_a_time(round_trip, messages, gap, warmup=20)) * 1e3 for gap in gaps_ms
    }
    send(STOP)
    recv()
    for stage in stages:
        stage.join(10)
    close()
    shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200, help="messages timed per gap and transport")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gaps-ms", default="0,100")
    p.add_argument("--cpus", help="pin the ring to these CPUs (e.g. 1 or 0-1); default: no pinning")
    a = p.parse_args(argv)
    gaps = [float(g) for g in a.gaps_ms.split(",")]
    if a.cpus:
        first, _, last = a.cpus.partition("-")
        os.sched_setaffinity(0, range(int(first), int(last or first) + 1))  # the stages inherit it
    runs: dict[str, dict[float, list[float]]] = {"zmq": {g: [] for g in gaps}, "unix": {g: [] for g in gaps}}
    for r in range(a.rounds):
        for kind in ("zmq", "unix") if r % 2 == 0 else ("unix", "zmq"):
            for gap, us in five_hops_us(kind, gaps, a.messages).items():
                runs[kind][gap].append(us)
        last = {k: {f"{g:g} ms": round(v[g][-1]) for g in gaps} for k, v in runs.items()}
        print(f"round {r + 1}, µs: {last}", flush=True)
    print(
        f"\nfive hops, median µs of {a.messages} messages, median of {a.rounds} rounds (CPUs: {a.cpus or 'any'})\n"
    )
    print("| gap | ZMQ PUSH/PULL | Unix SOCK_SEQPACKET | ZMQ / Unix |\n|---|---:|---:|---:|")
    for gap in gaps:
        z, u = (statistics.median(runs[k][gap]) for k in ("zmq", "unix"))
        print(f"| {gap:g} ms | {z:,.0f} | {u:,.0f} | {z / u:.1f}× |")


if __name__ == "__main__":
    main()
