"""How embedserve's throughput and tail latency scale with load and with input length, in one run.

    python -m bench.scaling [--dtype float32|bfloat16] [--duration 20]

1. Loads: 1, 4, 16 and 64 clients x 1, 8 and 64 inputs per request, on the mixed RAG corpus
   (half 5-20-token queries, half 50-250-token passages): tokens/s, p50 and p99 of each.
2. Input length: 16 clients x 8 inputs of corpora whose every text is 16, 64 or 256 tokens long:
   tokens/s and inputs/s, i.e. how the cost of an input grows with its length (attention is
   quadratic in it, the rest linear).

One server (whole-input cache off: the corpus repeats) serves every load in turn; each load warms
up for longer than one round of its requests takes, so the window measures steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from embedserve.bench.corpus import (
    bundled_model_path,
    count_tokens,
    load_tokenizer,
    make_corpus,
    make_fixed_length_corpus,
)
from embedserve.bench.loadgen import LoadConfig, Summary, first_model, run_load
from embedserve.bench.server_process import free_port, running_server, server_command

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = (1, 4, 16, 64)
INPUTS = (1, 8, 64)
LENGTHS = (16, 64, 256)


def measure(url: str, model: str, clients: int, inputs: int, texts, tokens, a, rate: float) -> Summary:
    # NOTE: a closed loop needs one full round of requests before its latency means anything:
    # warm up for longer than concurrency x inputs x mean tokens / the expected tokens/s.
    round_s = clients * inputs * (sum(tokens) / len(tokens)) / rate
    cfg = LoadConfig(
        url=url, model=model, concurrency=clients, inputs_per_request=inputs,
        warmup=max(a.warmup, 1.5 * round_s), duration=max(a.duration, 2 * round_s), timeout=300,
    )  # fmt: skip
    summary = asyncio.run(run_load(cfg, texts, tokens, progress=False))
    print(
        f"{clients:>3} x {inputs:<3} {summary.tokens_per_s:>9,.0f} tokens/s  p50 {summary.latency_ms['p50']:>8,.0f}"
        f"  p99 {summary.latency_ms['p99']:>8,.0f} ms  errors {summary.errors or 'none'}",
        file=sys.stderr,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--server-args", default="--embedding-cache-size 0")
    a = p.parse_args(argv)
    tok = load_tokenizer(a.model_path)
    mixed = make_corpus(2000, 0, a.model_path)
    mixed_tokens = count_tokens(tok, mixed)
    by_length = {n: make_fixed_length_corpus(500, n, 1, a.model_path) for n in LENGTHS}
    port = free_port()
    cmd = [*server_command(port, a.model_path, a.dtype), *a.server_args.split()]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    grid: dict[tuple[int, int], Summary] = {}
    lengths: dict[int, Summary] = {}
    with running_server(cmd, port, RESULTS / f"scaling-server-{stamp}.log", 180) as url:
        model = first_model(url)
        rate = 5000.0  # a first guess of tokens/s, updated by each measurement
        for inputs in INPUTS:
            for clients in CLIENTS:
                s = measure(url, model, clients, inputs, mixed, mixed_tokens, a, rate)
                grid[(clients, inputs)] = s
                rate = max(rate, s.tokens_per_s)
        for n, texts in by_length.items():
            lengths[n] = measure(url, model, 16, 8, texts, count_tokens(tok, texts), a, rate)
    lines = [f"### Scaling ({a.dtype}; `python -m bench.scaling --dtype {a.dtype}`)", ""]
    lines += ["tokens/s (p99 ms) by clients (rows) and inputs per request (columns), mixed corpus:", ""]
    lines += ["| clients | " + " | ".join(f"{i} input{'s' if i > 1 else ''}" for i in INPUTS) + " |"]
    lines += ["|---:|" + "---:|" * len(INPUTS)]
    for c in CLIENTS:
        cells = [f"{grid[(c, i)].tokens_per_s:,.0f} ({grid[(c, i)].latency_ms['p99']:,.0f})" for i in INPUTS]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "16 clients x 8 inputs, every input the same length:", ""]
    lines += ["| tokens per input | tokens/s | inputs/s | p99 ms |", "|---:|---:|---:|---:|"]
    for n, s in lengths.items():
        lines.append(f"| {n} | {s.tokens_per_s:,.0f} | {s.inputs_per_s:,.1f} | {s.latency_ms['p99']:,.0f} |")
    print("\n".join(lines))
    out = RESULTS / f"scaling-{a.dtype}-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "grid": [{"clients": c, "inputs": i, **vars(s)} for (c, i), s in grid.items()],
                "lengths": [{"tokens": n, **vars(s)} for n, s in lengths.items()],
            },
            indent=2,
            default=str,
        )
    )
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
