"""Soak: a long run at about twice the server's capacity. Is load shed cleanly, and does anything leak?

1. Starts `python -m embedserve.launch` on a loopback port with a small `--max-queued-requests`, so
   the server must refuse (429) what it cannot queue.
2. Measures capacity briefly with the closed-loop load generator (which also warms every process),
   then takes a census of every server process: RSS, open file descriptors, /dev/shm segments.
3. Offers `--overload` (2) x that capacity for `--duration` seconds as open-loop arrivals, sampling
   the census every `--report-every` seconds.
4. Takes the census again once the last request has answered, stops the server with SIGTERM and
   checks that it exits 0 and leaves no process, shared-memory segment or socket directory behind.

    python -m bench.soak                      # 10 minutes, the bundled model
    python -m bench.soak --duration 30 --json # a quick look; --json saves bench/results/soak-*.json

Exits 1 when a check fails: a failed request, fd growth, RSS peaks rising past tolerance, or leftovers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.bench_vs_sentence_transformers import REPO, RESULTS
from embedserve.bench.corpus import bundled_model_path, count_tokens, load_tokenizer, make_corpus
from embedserve.bench.loadgen import LoadConfig, Summary, _batches, _loads, first_model, run_load
from embedserve.bench.server_process import _stop, _tail, _wait_healthy, free_port, server_command
from embedserve.ipc.heap import GROWTH_BEFORE_TRIM

MiB = 1 << 20


# ---- census: what the server's processes hold ---------------------------------------------


@dataclass
class ProcStat:
    pid: int
    rss: int  # bytes
    fds: int


def title(proc: psutil.Process, launcher_pid: int) -> str:
    """`embedserve::<name>` for a pipeline process; the launcher and helpers by role."""
    if proc.pid == launcher_pid:
        return "launcher"
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("embedserve::"):
        return cmd[0]
    return "resource_tracker" if any("resource_tracker" in c for c in cmd) else " ".join(cmd)[:40]


def server_processes(launcher_pid: int) -> list[psutil.Process]:
    root = psutil.Process(launcher_pid)
    return [root, *root.children(recursive=True)]


def census(launcher_pid: int) -> dict[str, ProcStat]:
    """RSS and open fds of the launcher and every descendant, keyed by title."""
    out = {}
    for proc in server_processes(launcher_pid):
        try:
            with proc.oneshot():
                out[title(proc, launcher_pid)] = ProcStat(proc.pid, proc.memory_info().rss, proc.num_fds())
        except psutil.NoSuchProcess:  # a helper that came and went between listing and reading
            pass
    return out


def shm_segments(launcher_pid: int) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/embedserve-{launcher_pid}-*"))


# ---- the open-loop driver -----------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    accepted: int = 0
    accepted_inputs: int = 0
    accepted_tokens: int = 0  # counted by the client's tokenizer
    cached_tokens: int = 0  # from the responses' usage
    refused: int = 0
    refused_with_retry_after: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # HTTP status or exception name -> count
    client_dropped: int = 0  # arrivals not sent because --max-in-flight requests were outstanding
    max_send_lag_s: float = 0.0  # how far the client itself fell behind its schedule
    send_s: float = 0.0  # from the first arrival to the last
    drain_s: float = 0.0  # from the last arrival until the last answer
    accepted_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)


async def _one(http: httpx.AsyncClient, model: str, batch: tuple[list[str], int], t: Tally) -> None:
    began = time.perf_counter()
    try:
        resp = await http.post("/v1/embeddings", json={"model": model, "input": batch[0]})
    except Exception as exc:  # NOTE: any exception is a failed request to report, never a crash
        t.failed[type(exc).__name__] += 1
        return
    ms = (time.perf_counter() - began) * 1e3
    if resp.status_code == 429:
        t.refused += 1
        t.refused_with_retry_after += "retry-after" in resp.headers
        t.refused_ms.append(ms)
        return
    if resp.status_code != 200:
        t.failed[str(resp.status_code)] += 1
        return
    try:
        body = _loads(resp.content)
        ok = len(body["data"]) == len(batch[0])
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        t.failed["bad_response"] += 1
        return
    t.accepted += 1
    t.accepted_inputs += len(batch[0])
    t.accepted_tokens += batch[1]
    t.cached_tokens += cached
    t.accepted_ms.append(ms)


async def drive_open_loop(
    url: str,
    model: str,
    rate: float,
    a: argparse.Namespace,
    batches: Iterator[tuple[list[str], int]],
    t: Tally,
) -> None:
    """Sends request i at t0 + i / rate, whatever the server does, for `a.duration` seconds.

    NOTE: open loop, not many closed-loop clients: a closed loop slows down with the server and
    resends at once after each 429, so its offered load is whatever the server allows, never a
    steady 2x. Fixed arrivals keep the pressure on and make refusals the server's decision alone.
    The only client-side bound is `--max-in-flight` outstanding requests (counted as
    client_dropped), which stays unused while the server refuses promptly.
    """
    n = min(math.ceil(rate * a.duration), a.max_requests)
    limits = httpx.Limits(max_connections=a.max_in_flight, max_keepalive_connections=a.max_in_flight)
    in_flight: set[asyncio.Task] = set()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=a.timeout, trust_env=False) as http:
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:  # behind schedule: send now, so the mean rate still holds
                t.max_send_lag_s = max(t.max_send_lag_s, -delay)
            if len(in_flight) >= a.max_in_flight:
                t.client_dropped += 1
                continue
            t.sent += 1
            task = asyncio.create_task(_one(http, model, next(batches), t))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        t.send_s = time.perf_counter() - t0
        if in_flight:  # every request carries --timeout, so this wait is bounded too
            await asyncio.wait(set(in_flight), timeout=a.timeout + 5)
        t.drain_s = time.perf_counter() - t0 - t.send_s


async def _sample(launcher_pid: int, t: Tally, every: float, samples: list[dict]) -> None:
    """Census and a progress line every `every` seconds, until cancelled."""
    t0 = time.perf_counter()
    while True:
        await asyncio.sleep(every)
        stats = census(launcher_pid)
        samples.append({"t": round(time.perf_counter() - t0, 1), **{k: vars(v) for k, v in stats.items()}})
        print(
            f"  t={time.perf_counter() - t0:5.0f}s  sent {t.sent}  accepted {t.accepted}  refused {t.refused}"
            f"  failed {sum(t.failed.values())}  dropped {t.client_dropped}"
            f"  rss {sum(s.rss for s in stats.values()) / MiB:,.0f} MiB  fds {sum(s.fds for s in stats.values())}",
            file=sys.stderr,
        )


async def soak(url: str, model: str, rate: float, a: argparse.Namespace, batches, pid: int) -> tuple:
    """The open-loop run with the census sampled alongside; (tally, samples)."""
    t, samples = Tally(), []
    sampler = asyncio.create_task(_sample(pid, t, a.report_every, samples))
    try:
        await drive_open_loop(url, model, rate, a, batches, t)
    finally:
        sampler.cancel()
    return t, samples


# ---- the server's life ----------------------------------------------------------------------


def start_server(a: argparse.Namespace, port: int, log) -> subprocess.Popen:
    cmd = server_command(port, a.model_path, a.dtype)
    cmd += ["--max-queued-requests", str(a.max_queued_requests)]
    if a.max_queued_tokens is not None:
        cmd += ["--max-queued-tokens", str(a.max_queued_tokens)]
    cmd += shlex.split(a.server_args)
    print(f"starting {' '.join(cmd)}\n  log: {log.name}", file=sys.stderr)
    # start_new_session: the server and its children form one process group _stop can clean up.
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_and_check(proc: subprocess.Popen, titles: dict[int, str], ipc_dir: str | None, grace: float) -> dict:
    """SIGTERM, then what is left: the exit code, processes still alive, segments, the socket dir.

    NOTE: looked at before `_stop` runs, because `_stop` kills stragglers and would hide them.
    """
    began = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(grace)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.perf_counter() - began
    children = []
    for pid in titles:
        try:
            if pid != proc.pid:
                children.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    # The resource tracker outlives the launcher by a moment (it frees the rings); give it that.
    _, alive = psutil.wait_procs(children, timeout=10)
    return {
        "exit_code": code,
        "stop_s": round(seconds, 2),
        "processes_left": [f"{titles[p.pid]} ({p.pid})" for p in alive],
        "shm_left": shm_segments(proc.pid),
        "ipc_dir_left": bool(ipc_dir and os.path.exists(ipc_dir)),
    }


def run(a: argparse.Namespace, proc: subprocess.Popen, url: str, log_path: Path) -> dict:
    texts = make_corpus(a.corpus, a.seed, a.model_path)
    tokens = count_tokens(load_tokenizer(a.model_path), texts)
    _wait_healthy(url, proc, log_path, a.ready_timeout)
    model, pid = first_model(url), proc.pid
    ready = census(pid)
    capacity = measure_capacity(a, url, model, texts, tokens)
    rate = a.target_rps or a.overload * capacity.requests_per_s
    if rate <= 0:
        raise RuntimeError(f"capacity phase answered nothing: {capacity.errors}\n{_tail(log_path)}")
    print(f"capacity {capacity.requests_per_s:.1f} req/s; offering {rate:.1f} req/s", file=sys.stderr)
    time.sleep(a.settle)
    start, shm_start = census(pid), shm_segments(pid)
    batches = _batches(texts, tokens, a.inputs_per_request)
    tally, samples = asyncio.run(soak(url, model, rate, a, batches, pid))
    time.sleep(a.settle)  # NOTE: the client is closed by now; let the server close its sockets too
    end, shm_end = census(pid), shm_segments(pid)
    titles = {s.pid: name for name, s in {**start, **end}.items()}
    found = re.search(r"IPC sockets in (\S+)", log_path.read_text(errors="replace"))
    stopped = stop_and_check(proc, titles, found.group(1) if found else None, a.shutdown_grace)
    return {
        "args": vars(a),
        "model": model,
        "launcher_pid": pid,
        "capacity": dataclasses.asdict(capacity),
        "offered_rps": rate,
        "tally": {**dataclasses.asdict(tally), "failed": dict(tally.failed)},
        "census": {
            "ready": _plain(ready),
            "start": _plain(start),
            "mid": _mid(samples, tally.send_s, start),
            "end": _plain(end),
            "samples": samples,
        },
        "shm": {"start": shm_start, "end": shm_end},
        "after_stop": stopped,
    }


def measure_capacity(
    a: argparse.Namespace, url: str, model: str, texts: list[str], tokens: list[int]
) -> Summary:
    """Closed-loop throughput, which also warms every process before the start census.

    NOTE: it walks the corpus from the middle and the soak from the start. With a corpus at least
    twice `--embedding-cache-size` (LRU), neither walk ever finds its texts still cached, so both
    phases measure the model, while the soak still churns the cache (insert, evict) throughout.
    """
    half = len(texts) // 2
    cfg = LoadConfig(
        url=url,
        model=model,
        concurrency=a.concurrency,
        inputs_per_request=a.inputs_per_request,
        warmup=a.capacity_warmup,
        duration=a.capacity_seconds,
        timeout=a.timeout,
    )
    summary = asyncio.run(run_load(cfg, texts[half:] + texts[:half], tokens[half:] + tokens[:half], False))
    if summary.errors:
        print(f"capacity phase errors (lower --concurrency?): {summary.errors}", file=sys.stderr)
    return summary


def _plain(stats: dict[str, ProcStat]) -> dict[str, dict]:
    return {k: vars(v) for k, v in stats.items()}


def _mid(samples: list[dict], send_s: float, start: dict[str, ProcStat]) -> dict[str, dict]:
    """The sample nearest half-way (the table's mid column; the verdict compares peaks, see peak_growth_mib)."""
    if not samples:
        return _plain(start)
    best = min(samples, key=lambda s: abs(s["t"] - send_s / 2))
    return {k: v for k, v in best.items() if k != "t"}


# NOTE: these hand their heap back only once it stands GROWTH_BEFORE_TRIM above their working set
# (embedserve/ipc/heap.py: trimming after every batch cost the executor 15 % of a core), so their RSS
# may saw within that band without leaking.
TRIMMING_PROCESSES = ("embedserve::executor", "embedserve::detokenizer")


def peak_growth_mib(samples: list[dict], name: str, end_rss: int) -> float | None:
    """RSS growth of one process from the run's second quarter to its last, peak against peak.

    NOTE: a leak raises the peak; a heap the executor trims back once it stands a band above its
    working set (embedserve/ipc/heap.py) saws up and down within that band and does not. End
    against mid-run would judge two points of the saw."""
    series = [s[name]["rss"] for s in samples if name in s] + [end_rss]
    quarter = len(series) // 4
    if quarter == 0:
        return None
    return (max(series[-quarter:]) - max(series[quarter : 2 * quarter])) / MiB


# ---- report -----------------------------------------------------------------------------------


def problems(r: dict, a: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(failures, warnings) of a run's result."""
    t, cs, stop = r["tally"], r["census"], r["after_stop"]
    bad, warn = [], []
    if t["failed"]:
        bad.append(f"failed requests {t['failed']}")
    if not t["accepted"]:
        bad.append("nothing accepted")
    for name, s in cs["start"].items():
        e = cs["end"].get(name)
        if e is None or e["pid"] != s["pid"]:
            bad.append(f"{name} ({s['pid']}) gone or replaced by the end")
            continue
        if e["fds"] - s["fds"] > a.fd_tolerance:
            bad.append(f"{name}: {e['fds'] - s['fds']} more open fds")
        grew = peak_growth_mib(cs.get("samples", []), name, e["rss"])
        if grew is None:  # too few samples for quarters: end against mid-run
            grew = (e["rss"] - cs["mid"].get(name, s)["rss"]) / MiB
        allowed = a.rss_tolerance_mib + (GROWTH_BEFORE_TRIM / MiB if name in TRIMMING_PROCESSES else 0)
        if grew > allowed:
            bad.append(
                f"{name}: RSS peak grew {grew:.0f} MiB from the second quarter of the run to the last "
                f"(allowed {allowed:.0f})"
            )
    if r["shm"]["start"] != r["shm"]["end"]:
        bad.append("shared-memory segments changed during the run")
    if stop["exit_code"] != 0:
        bad.append(f"exit code {stop['exit_code']} after SIGTERM")
    for key in ("processes_left", "shm_left"):
        if stop[key]:
            bad.append(f"{key}: {stop[key]}")
    if stop["ipc_dir_left"]:
        bad.append("socket directory left behind")
    if not t["refused"]:
        warn.append("nothing refused: not overloaded (raise --overload or lower --max-queued-requests)")
    if t["refused"] != t["refused_with_retry_after"]:
        warn.append(f"{t['refused'] - t['refused_with_retry_after']} refusals without Retry-After")
    if t["client_dropped"]:
        warn.append(f"{t['client_dropped']} arrivals dropped by the client (--max-in-flight reached)")
    return bad, warn


def _pct(ms: list[float]) -> str:
    if not ms:
        return "n/a"
    p50, p99 = np.percentile(ms, [50, 99])
    return f"p50 {p50:,.1f}  p99 {p99:,.1f} ms"


def format_report(r: dict, bad: list[str], warn: list[str]) -> str:
    t, cap, cs, stop, a = r["tally"], r["capacity"], r["census"], r["after_stop"], r["args"]
    lines = [
        f"model {r['model']}  {a['inputs_per_request']} inputs/request  cpus {os.cpu_count()}",
        f"capacity    {cap['requests_per_s']:.1f} req/s closed-loop ({cap['concurrency']} clients, "
        f"{cap['seconds']:.0f} s); offered {r['offered_rps']:.1f} req/s open-loop for {t['send_s']:.0f} s "
        f"(+{t['drain_s']:.0f} s to drain)",
        f"requests    sent {t['sent']:,}   accepted {t['accepted']:,}   refused {t['refused']:,} "
        f"(Retry-After on {t['refused_with_retry_after']:,})   failed {sum(t['failed'].values()):,} "
        f"{t['failed'] or ''}  client-dropped {t['client_dropped']}",
        f"accepted    {t['accepted'] / t['send_s']:.1f} req/s  {t['accepted_tokens'] / t['send_s']:,.0f} tokens/s"
        f"  (offered / accepted {r['offered_rps'] * t['send_s'] / max(t['accepted'], 1):.1f}x)"
        f"   latency {_pct(t['accepted_ms'])}",
        f"refused     latency {_pct(t['refused_ms'])}   client lag max {t['max_send_lag_s'] * 1e3:.0f} ms"
        f"   cached tokens {t['cached_tokens'] / max(t['accepted_tokens'], 1):.1%} of accepted",
        "",
        f"{'process':<24}{'pid':>8}  RSS MiB: start   mid   end  growth 2nd-half   fds: start  end  growth",
    ]
    for name, s in cs["start"].items():
        m, e = cs["mid"].get(name, s), cs["end"].get(name, {"rss": 0, "fds": 0})
        lines.append(
            f"{name:<24}{s['pid']:>8}{s['rss'] / MiB:>16.0f}{m['rss'] / MiB:>6.0f}{e['rss'] / MiB:>6.0f}"
            f"{(e['rss'] - s['rss']) / MiB:>+8.0f}{(e['rss'] - m['rss']) / MiB:>+9.0f}"
            f"{s['fds']:>14}{e['fds']:>5}{e['fds'] - s['fds']:>+8}"
        )
    lines += [
        "",
        f"/dev/shm    embedserve-{r['launcher_pid']}-*: {len(r['shm']['start'])} at start, "
        f"{len(r['shm']['end'])} at end, {len(stop['shm_left'])} after stop",
        f"stop        SIGTERM -> exit {stop['exit_code']} in {stop['stop_s']} s; processes left "
        f"{len(stop['processes_left'])}; socket dir left {'yes' if stop['ipc_dir_left'] else 'no'}",
        *[f"warning     {w}" for w in warn],
        f"verdict     {'FAIL: ' + '; '.join(bad) if bad else 'PASS'}",
    ]
    return "\n".join(lines)


# ---- entry point ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of overload")
    p.add_argument("--overload", type=float, default=2.0, help="offered load as a multiple of capacity")
    p.add_argument(
        "--target-rps",
        type=float,
        help="offer this many requests/s instead of overload x capacity (the capacity phase still runs: "
        "it warms the server before the start census)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="clients of the capacity phase: enough to keep the model busy, at most --max-queued-requests",
    )
    p.add_argument("--inputs-per-request", type=int, default=4)
    p.add_argument("--capacity-warmup", type=float, default=3.0)
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=32,
        help="given to the server; small, so overload is refused rather than queued for minutes",
    )
    p.add_argument("--max-queued-tokens", type=int, help="given to the server (default: the server's)")
    p.add_argument("--server-args", default="", help="more server options, e.g. '--embedding-cache-size 0'")
    p.add_argument("--max-in-flight", type=int, default=512, help="client bound on outstanding requests")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="bound on requests sent")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--corpus", type=int, default=8192, help="seeded corpus size (keep >= 2x the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-every", type=float, default=10.0, help="seconds between census samples")
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds before each census")
    p.add_argument("--fd-tolerance", type=int, default=0, help="open fds a process may gain")
    p.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=64.0,
        help="RSS peak a process may gain from the run's second quarter to its last",
    )
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds SIGTERM may take")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--json", action="store_true", help="also save the result to bench/results/soak-*.json")
    a = p.parse_args(argv)
    if min(a.duration, a.overload, a.capacity_seconds, a.timeout, a.report_every) <= 0:
        p.error("durations, --overload and --timeout must be > 0")
    if min(a.concurrency, a.inputs_per_request, a.max_in_flight, a.max_requests, a.corpus) < 1:
        p.error("counts must be >= 1")
    a.model_path = a.model_path or bundled_model_path()
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = RESULTS / f"soak-server-{stamp}.log"
    port = free_port()
    with open(log_path, "wb") as log:
        proc = start_server(a, port, log)
        try:
            result = run(a, proc, f"http://127.0.0.1:{port}", log_path)
        finally:
            _stop(proc)  # NOTE: a no-op after a clean stop; otherwise it ends what we started
    bad, warn = problems(result, a)
    result["failures"], result["warnings"] = bad, warn
    print(format_report(result, bad, warn))
    if a.json:
        out = RESULTS / f"soak-{stamp}.json"
        out.write_text(json.dumps(result, indent=2))
        print(f"saved {out}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
