"""One short query to a server with nothing else to do: its end-to-end latency against the bare forward
of that query, and where the difference goes, stage by stage, for each gap between requests.

    python -m bench.idle_latency [--dtype float32|bfloat16] [--requests 200] [--gaps-ms 0,100] [--text "..."]

A gap of 0 sends the next request as soon as the last answer is in (the pipeline's floor); 100 ms is
a user's query now and then, where the machine has gone idle in between (on a VM, its vCPUs halt).
Phase 1, in this process with nothing else running: the same model, dtype, thread count and attention
backend as the server (`ModelRunner`, in the executor's environment), the query's token ids, forwards
after each gap (p50 = the bare forward); and, as the plain in-process yardstick, transformers'
`BertModel` on the same ids back to back (in a child process, with libgomp's default spinning). Phase 2, after phase 1 has freed its models: the launched
server (whole-input cache off, or every repeat would be a cache hit), one client sending the query
again and again, one at a time, after each gap. Per-stage times come from the server's own /metrics
histograms (mean per request over the run of that gap):

    HTTP total   the HTTP process, request accepted -> response written
    tokenizer    tokenizer process time            queue    scheduler wait
    forward      executor, the batch (this query)  output   output process, encoding the body
    HTTP + IPC   the rest of HTTP total: parsing, validation, five ZMQ hops, the ring reads
    client       e2e minus HTTP total: the client library and the loopback socket
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from embedserve.launch import set_child_env_defaults

# NOTE: the executor's environment (GOMP_SPINCOUNT among it), set before torch loads libgomp.
set_child_env_defaults()

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from embedserve.bench.corpus import bundled_model_path, load_tokenizer  # noqa: E402
from embedserve.bench.one_at_a_time import SHORT_QUERY, one_at_a_time  # noqa: E402
from embedserve.bench.server_process import free_port, running_server, server_command  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
STAGES = (
    "request_latency_seconds",
    "tokenize_seconds",
    "queue_wait_seconds",
    "forward_seconds",
    "output_seconds",
)


def bare_forward_ms(
    a: argparse.Namespace, ids: np.ndarray
) -> tuple[dict[float, list[float]], list[float], str]:
    """ModelRunner's forward after each gap, and transformers' BertModel back to back (ms)."""
    import torch

    from embedserve.gpu_proc.model_runner import ModelRunner
    from embedserve.model_config import load_model_config
    from embedserve.server_args import ServerArgs

    threads = ServerArgs(model_path=a.model_path).executor_threads
    runner = ModelRunner(load_model_config(a.model_path), device="cpu", dtype=a.dtype, num_threads=threads)
    forward = functools.partial(runner.embed, ids, [len(ids)])
    by_gap = {gap: one_at_a_time(forward, a.requests, gap, warmup=10) for gap in a.gaps}
    backend = f"{runner.attention_backend.name}, {threads} threads, torch {torch.__version__}"
    del runner, forward
    gc.collect()
    return by_gap, plain_forward_ms(a), backend


def plain_forward_ms(a: argparse.Namespace) -> list[float]:
    """transformers' BertModel on the query, back to back, in a child process with libgomp's default
    spin count (300,000), as a user's own script would run it, not the executor's 10,000."""
    env = {**os.environ, "GOMP_SPINCOUNT": "300000"}
    cmd = [sys.executable, "-m", "bench.idle_latency", "--transformers-only", "--dtype", a.dtype]
    cmd += ["--requests", str(a.requests), "--model-path", a.model_path, "--text", a.text]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_only(a: argparse.Namespace, ids: np.ndarray) -> list[float]:
    import torch
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(a.model_path, torch_dtype=getattr(torch, a.dtype)).eval()
    hf_ids = torch.from_numpy(ids.astype(np.int64))[None]
    with torch.inference_mode():
        return one_at_a_time(
            lambda: hf(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids)).last_hidden_state.mean(1),
            a.requests,
            warmup=10,
        )


def scrape(client: httpx.Client, url: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in client.get(url + "/metrics").text.splitlines():
        m = re.match(r"embedserve_(\w+?)_(sum|count)\{([^}]*)\} (\S+)", line)
        if m and "/encode" not in m.group(3):
            out[(m.group(1), m.group(2))] = out.get((m.group(1), m.group(2)), 0.0) + float(m.group(4))
    return out


def server_phase(a: argparse.Namespace) -> dict[float, tuple[list[float], dict[str, float]]]:
    """Per gap: the client's e2e samples (ms) and the server's mean per-stage times (ms)."""
    port = free_port()
    cmd = [*server_command(port, a.model_path, a.dtype), "--embedding-cache-size", "0"]
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "idle-latency-server.log"
    out = {}
    with running_server(cmd, port, log, 180) as url, httpx.Client(trust_env=False, timeout=30) as client:
        model = client.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "input": a.text}
        post = lambda: client.post(url + "/v1/embeddings", json=body).raise_for_status()  # noqa: E731
        for gap in a.gaps:
            one_at_a_time(post, 10)  # warm-up, kept out of the stage counters read next
            before = scrape(client, url)
            e2e = one_at_a_time(post, a.requests, gap)
            after = scrape(client, url)
            stages = {}
            for stage in STAGES:
                count = after[(stage, "count")] - before[(stage, "count")]
                stages[stage] = (after[(stage, "sum")] - before[(stage, "sum")]) * 1e3 / max(1.0, count)
            out[gap] = e2e, stages
    return out


def report(a, ids, bare, plain, backend, served) -> str:
    p50 = statistics.median
    names = [
        "client e2e (p50)",
        "client e2e (mean)",
        "  client library + loopback (mean e2e - HTTP total)",
        "  HTTP total (mean)",
        "    tokenizer",
        "    scheduler queue wait",
        "    executor forward",
        "    output (response body)",
        "    HTTP parse/validate + 5 IPC hops",
    ]
    columns = {}
    for gap, (e2e, stages) in served.items():
        http = stages["request_latency_seconds"]
        inside = sum(stages[s] for s in ("tokenize_seconds", "queue_wait_seconds", "forward_seconds"))
        inside += stages["output_seconds"]
        columns[gap] = [
            p50(e2e),
            statistics.mean(e2e),
            statistics.mean(e2e) - http,
            http,
            stages["tokenize_seconds"],
            stages["queue_wait_seconds"],
            stages["forward_seconds"],
            stages["output_seconds"],
            http - inside,
        ]
    gaps = list(served)
    header = " | ".join(f"gap {g:g} ms" for g in gaps)
    lines = [
        f"### One short query, one request at a time ({a.dtype})",
        "",
        f"- query: {a.text!r} ({len(ids)} tokens); model {a.model_path}; {backend}",
        f"- `python -m bench.idle_latency --dtype {a.dtype} --requests {a.requests} "
        f"--gaps-ms {','.join(f'{g:g}' for g in gaps)}`",
        f"- transformers `BertModel`, in-process, back to back: p50 **{p50(plain):.2f} ms**",
        "",
        f"| stage (ms) | {header} |",
        "|---|" + "---:|" * len(gaps),
        *(
            f"| {name} | " + " | ".join(f"{columns[g][i]:.2f}" for g in gaps) + " |"
            for i, name in enumerate(names)
        ),
        "| p99 e2e | " + " | ".join(f"{np.percentile(served[g][0], 99):.2f}" for g in gaps) + " |",
        "| bare forward, in-process, same gap (p50) | "
        + " | ".join(f"{p50(bare[g]):.2f}" for g in gaps)
        + " |",
        "| **e2e / bare forward, same gap** | "
        + " | ".join(f"**{p50(served[g][0]) / p50(bare[g]):.2f}x**" for g in gaps)
        + " |",
        "| e2e / transformers back to back | "
        + " | ".join(f"{p50(served[g][0]) / p50(plain):.2f}x" for g in gaps)
        + " |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--requests", type=int, default=200, help="requests (and bare forwards) per gap")
    p.add_argument("--gaps-ms", default="0,100", help="comma-separated pauses before each request")
    p.add_argument("--text", default=SHORT_QUERY)
    p.add_argument("--transformers-only", action="store_true", help=argparse.SUPPRESS)  # the child's job
    a = p.parse_args(argv)
    a.gaps = [float(g) for g in a.gaps_ms.split(",")]
    tok = load_tokenizer(a.model_path)
    ids = np.asarray(tok.encode(a.text).ids, dtype=np.int32)
    if a.transformers_only:
        print(json.dumps(transformers_only(a, ids)))
        return
    bare, plain, backend = bare_forward_ms(a, ids)
    served = server_phase(a)
    print(report(a, ids, bare, plain, backend, served))


if __name__ == "__main__":
    main()
