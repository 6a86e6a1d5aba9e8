"""One short query on an idle server: its end-to-end latency against the bare forward of that query, and
where the difference goes, stage by stage.

    python -m bench.idle_latency [--dtype float32|bfloat16] [--requests 300] [--text "..."]

Phase 1, in this process with nothing else running: the same model, dtype, thread count and attention
backend as the server, the query's token ids, forwards back to back after a warm-up (p50 = the bare
forward), then forwards with a pause between them like the pause the server sees between requests.
Phase 2, after phase 1 has freed its model: the launched server (whole-input cache off, or every
repeat would be a cache hit), one client sending the query again and again, one at a time. Per-stage
times come from the server's own /metrics histograms (mean per request over the run):

    HTTP total   the HTTP process, request accepted -> response written
    tokenizer    tokenizer process time            queue    scheduler wait
    forward      executor, the batch (this query)  output   output process, encoding the body
    HTTP + IPC   the rest of HTTP total: parsing, validation, five ZMQ hops, the ring reads
    client       e2e minus HTTP total: the client library and the loopback socket
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from embedserve.bench.corpus import bundled_model_path, load_tokenizer
from embedserve.bench.server_process import free_port, running_server, server_command

RESULTS = Path(__file__).resolve().parent / "results"
QUERY = "how do I reset my router password"
STAGES = (
    "request_latency_seconds",
    "tokenize_seconds",
    "queue_wait_seconds",
    "forward_seconds",
    "output_seconds",
)


def bare_forward_ms(a: argparse.Namespace, ids: np.ndarray) -> tuple[list[float], list[float], str]:
    import torch

    from embedserve.gpu_proc.model_runner import ModelRunner
    from embedserve.model_config import load_model_config
    from embedserve.server_args import ServerArgs

    threads = ServerArgs(model_path=a.model_path).executor_threads
    runner = ModelRunner(load_model_config(a.model_path), device="cpu", dtype=a.dtype, num_threads=threads)
    for _ in range(30):
        runner.embed(ids, [len(ids)])
    back_to_back, paused = [], []
    for samples, pause in ((back_to_back, 0.0), (paused, a.pause_ms / 1e3)):
        for _ in range(a.requests):
            time.sleep(pause)
            started = time.perf_counter()
            runner.embed(ids, [len(ids)])
            samples.append((time.perf_counter() - started) * 1e3)
    backend = f"{runner.attention_backend.name}, {threads} threads, torch {torch.__version__}"
    del runner
    gc.collect()
    return back_to_back, paused, backend


def scrape(client: httpx.Client, url: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in client.get(url + "/metrics").text.splitlines():
        m = re.match(r"embedserve_(\w+?)_(sum|count)\{([^}]*)\} (\S+)", line)
        if m and "/encode" not in m.group(3):
            out[(m.group(1), m.group(2))] = out.get((m.group(1), m.group(2)), 0.0) + float(m.group(4))
    return out


def server_phase(a: argparse.Namespace) -> tuple[list[float], dict[str, float]]:
    port = free_port()
    cmd = [*server_command(port, a.model_path, a.dtype), "--embedding-cache-size", "0"]
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "idle-latency-server.log"
    with running_server(cmd, port, log, 180) as url, httpx.Client(trust_env=False, timeout=30) as client:
        model = client.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "input": a.text}
        for _ in range(30):
            client.post(url + "/v1/embeddings", json=body).raise_for_status()
        before = scrape(client, url)
        e2e = []
        for _ in range(a.requests):
            started = time.perf_counter()
            client.post(url + "/v1/embeddings", json=body).raise_for_status()
            e2e.append((time.perf_counter() - started) * 1e3)
        after = scrape(client, url)
    stages = {}
    for stage in STAGES:
        count = after[(stage, "count")] - before[(stage, "count")]
        stages[stage] = (after[(stage, "sum")] - before[(stage, "sum")]) * 1e3 / max(1.0, count)
    return e2e, stages


def report(a, ids, bare, paused, backend, e2e, stages) -> str:
    p50 = statistics.median
    http = stages["request_latency_seconds"]
    inside = stages["tokenize_seconds"] + stages["queue_wait_seconds"] + stages["forward_seconds"]
    inside += stages["output_seconds"]
    rows = [
        ("client e2e (p50)", p50(e2e)),
        ("  client library + loopback", p50(e2e) - http),
        ("  HTTP total (mean)", http),
        ("    tokenizer", stages["tokenize_seconds"]),
        ("    scheduler queue wait", stages["queue_wait_seconds"]),
        ("    executor forward", stages["forward_seconds"]),
        ("    output (response body)", stages["output_seconds"]),
        ("    HTTP parse/validate + 5 IPC hops", http - inside),
    ]
    lines = [
        f"### One short query on an idle server ({a.dtype})",
        "",
        f"- query: {a.text!r} ({len(ids)} tokens); model {a.model_path}; {backend}",
        f"- `python -m bench.idle_latency --dtype {a.dtype} --requests {a.requests}`",
        f"- bare forward, in-process: p50 **{p50(bare):.2f} ms** back to back (min {min(bare):.2f}); "
        f"p50 {p50(paused):.2f} ms with a {a.pause_ms:.0f} ms pause before each",
        "",
        "| stage | ms |",
        "|---|---:|",
        *(f"| {name} | {ms:.2f} |" for name, ms in rows),
        "",
        f"end-to-end p50 / bare forward p50: **{p50(e2e) / p50(bare):.2f}x** "
        f"(against the paused forward: {p50(e2e) / p50(paused):.2f}x); p99 e2e {np.percentile(e2e, 99):.2f} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--text", default=QUERY)
    p.add_argument("--pause-ms", type=float, default=3.0, help="pause between paused bare forwards")
    a = p.parse_args(argv)
    tok = load_tokenizer(a.model_path)
    ids = np.asarray(tok.encode(a.text).ids, dtype=np.int32)
    bare, paused, backend = bare_forward_ms(a, ids)
    e2e, stages = server_phase(a)
    print(report(a, ids, bare, paused, backend, e2e, stages))


if __name__ == "__main__":
    main()
