"""One side-by-side run: embedserve under closed-loop HTTP load, then sentence-transformers in-process.

The two phases never overlap: the server is stopped (SIGTERM, then waited for) before
sentence-transformers is even imported, so on a small machine neither steals the other's cores.
Both phases see the same seeded corpus and count tokens with the same tokenizer.

    python -m bench.bench_vs_sentence_transformers --duration 10 --warmup 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedserve.bench.corpus import bundled_model_path, count_tokens, load_tokenizer
from embedserve.bench.loadgen import (
    Summary,
    add_load_args,
    check_load_args,
    first_model,
    load_config,
    load_texts,
    run_load,
)
from embedserve.bench.server_process import free_port, running_server, server_command

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"  # git-ignored


@dataclass
class STSummary:
    chunk: int  # texts per encode() call; encode() sorts by length within each call
    seconds: float
    calls: int
    inputs: int
    tokens: int
    inputs_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float]  # per encode() call of `chunk` texts


# ---- the embedserve phase ----------------------------------------------------------------


def run_embedserve(a: argparse.Namespace, texts: list[str], tokens: list[int], log_path: Path) -> Summary:
    port = free_port()
    cmd = server_command(port, a.model_path, a.dtype) + a.server_args.split()
    print(f"starting {' '.join(cmd)}\n  log: {log_path}", file=sys.stderr)
    with running_server(cmd, port, log_path, a.ready_timeout, cwd=REPO) as url:
        cfg = load_config(a, url, first_model(url))
        return asyncio.run(run_load(cfg, texts, tokens, progress=not a.no_progress))


# ---- the sentence-transformers phase -----------------------------------------------------


def run_sentence_transformers(a: argparse.Namespace, texts: list[str], tokens: list[int]) -> STSummary:
    """Encodes the corpus in `--st-chunk` slices, cycling, for warmup then `--duration` seconds."""
    import torch  # NOTE: imported only now, after the server is gone
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(a.model_path).to(getattr(torch, a.dtype))
    chunks = _chunks(len(texts), a.st_chunk)
    _encode_for(model, texts, chunks, a.warmup)
    t0 = time.perf_counter()
    spans = _encode_for(model, texts, chunks, a.duration)
    seconds = time.perf_counter() - t0
    n_in = sum(hi - lo for lo, hi, _ in spans)
    n_tok = sum(sum(tokens[lo:hi]) for lo, hi, _ in spans)
    lat = np.asarray([ms for _, _, ms in spans])
    return STSummary(
        chunk=a.st_chunk,
        seconds=seconds,
        calls=len(spans),
        inputs=n_in,
        tokens=n_tok,
        inputs_per_s=n_in / seconds,
        tokens_per_s=n_tok / seconds,
        latency_ms={
            **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)},
            "mean": float(lat.mean()),
        },
    )


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    while True:
        for lo in range(0, n, size):
            yield lo, min(lo + size, n)


def _encode_for(model, texts: list[str], chunks: Iterator[tuple[int, int]], seconds: float) -> list:
    """Whole encode() calls until `seconds` have passed (at least one); returns (lo, hi, ms) each."""
    spans = []
    end = time.perf_counter() + seconds
    while not spans or time.perf_counter() < end:
        lo, hi = next(chunks)
        t = time.perf_counter()
        model.encode(texts[lo:hi], batch_size=32, normalize_embeddings=True, show_progress_bar=False)
        spans.append((lo, hi, (time.perf_counter() - t) * 1e3))
    return spans


# ---- report ------------------------------------------------------------------------------


def format_table(es: Summary, st: STSummary) -> str:
    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y else "n/a"

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.1f}"

    rows = [
        (
            "tokens/s",
            f"{es.tokens_per_s:,.0f}",
            f"{st.tokens_per_s:,.0f}",
            ratio(es.tokens_per_s, st.tokens_per_s),
        ),
        (
            "inputs/s",
            f"{es.inputs_per_s:,.1f}",
            f"{st.inputs_per_s:,.1f}",
            ratio(es.inputs_per_s, st.inputs_per_s),
        ),
        ("measured s", f"{es.seconds:.1f}", f"{st.seconds:.1f}", ""),
        ("inputs", f"{es.inputs:,}", f"{st.inputs:,}", ""),
        *[(f"latency {k} ms", ms(es.latency_ms[k]), ms(st.latency_ms[k]), "") for k in ("p50", "p90", "p99")],
        ("errors", str(sum(es.errors.values())), "0", ""),
    ]
    head = ("", "embedserve", "sentence-transformers", "embedserve/ST")
    lines = [f"{r[0]:<16}{r[1]:>14}{r[2]:>24}{r[3]:>16}" for r in (head, *rows)]
    lines.append(
        f"embedserve latency: one HTTP request of {es.inputs_per_request} input(s) at concurrency "
        f"{es.concurrency}; ST latency: one encode() call of {st.chunk} texts. Not like for like."
    )
    if es.errors:
        lines.append(f"embedserve errors: {es.errors}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="given to the server and to sentence-transformers alike",
    )
    add_load_args(p)
    p.add_argument(
        "--server-args",
        default="--embedding-cache-size 0",
        help="extra server flags; the default turns the whole-input cache off, because the corpus repeats "
        "and a cache hit is not a forward (pass '' to measure with the cache)",
    )
    p.add_argument("--st-chunk", type=int, default=128, help="texts per sentence-transformers encode() call")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    check_load_args(p, a)
    if a.st_chunk < 1:
        p.error("--st-chunk must be >= 1")
    a.model_path = a.model_path or bundled_model_path()
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    texts = load_texts(a.corpus, a.corpus_file, a.seed, a.model_path)
    tokens = count_tokens(load_tokenizer(a.model_path), texts)
    print(f"corpus: {len(texts)} texts, {sum(tokens):,} tokens, mean {np.mean(tokens):.1f}", file=sys.stderr)
    es = run_embedserve(a, texts, tokens, RESULTS / f"server-{stamp}.log")
    print("embedserve done; running sentence-transformers in-process", file=sys.stderr)
    st = run_sentence_transformers(a, texts, tokens)
    print(f"model {a.model_path}  dtype {a.dtype}  corpus {len(texts)} texts  cpus {os.cpu_count()}")
    print(format_table(es, st))
    out = RESULTS / f"bench-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(a),
                "embedserve": dataclasses.asdict(es),
                "sentence_transformers": dataclasses.asdict(st),
            },
            indent=2,
        )
    )
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
