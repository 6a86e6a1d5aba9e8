"""Radix prefix cache on vs `--disable-radix-cache`, side by side in one run, on a shared-prefix workload.

Every input is one fixed ~60-token instruction followed by a distinct 5-20-token query, the way
instruction-tuned embedders (gte-Qwen2, e5-mistral) are queried. With the radix cache the server
computes the instruction once and afterwards only each query's own tokens, so tokens/s should
approach (prefix + query) / query times the uncached rate on a model whose forward dominates.

The model is a random-weight Qwen2 (hidden 1024, 8 layers), compute-bound on a CPU yet quick to
load, built once into `--model-folder` with the bundled MiniLM tokenizer beside it. Both servers
run with `--embedding-cache-size 0` and every query is sent once only, so the radix cache is the
only thing that differs. The servers run one after the other, never together.

    python -m bench.prefix_cache_bench --warmup 10 --duration 60 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.bench_vs_sentence_transformers import RESULTS
from embedserve.bench.corpus import (
    QUERY_TOKENS,
    bundled_model_path,
    count_tokens,
    load_tokenizer,
    make_corpus,
)
from embedserve.bench.loadgen import _loads, first_model
from embedserve.bench.server_process import free_port, running_server, server_command

INSTRUCTION = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query. Prefer "
    "passages from reliable sources that state the facts directly, cover the main intent of the "
    "question, and give specific names, numbers and dates where they matter; ignore advertising, "
    "navigation and boilerplate text.\nQuery: "
)
# NOTE: initializer_range 0.05, not transformers' 0.02: at 0.02 attention is nearly uniform and
# every input's last-token embedding is within cosine 0.97 of every other's, which would make the
# cache-on vs cache-off agreement check below say little.
MODEL_CONFIG = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    vocab_size=30522,
    max_position_embeddings=2048,
    initializer_range=0.05,
    tie_word_embeddings=False,
)
DEFAULT_FOLDER = Path("/tmp/embedserve-bench-qwen2-h1024-l8")
SAMPLE = 8  # queries held out of the load, embedded afterwards: never seen, so only the prefix is cached
AGREEMENT = 0.9999  # least cosine between the two servers' embeddings of one input


def build_model(folder: Path) -> None:
    """A random bare Qwen2Model with last-token pooling + Normalize; skipped if already built."""
    if (folder / "config.json").is_file():
        return
    import torch
    import transformers

    from tests.tiny_models import TOKENIZER_FILES, write_sentence_transformers_files

    started = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")  # renamed at the end: a killed build is not reused
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    transformers.Qwen2Model(transformers.Qwen2Config(**MODEL_CONFIG)).eval().save_pretrained(partial)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(bundled_model_path()) / name, partial / name)
    write_sentence_transformers_files(partial, MODEL_CONFIG["hidden_size"], "last", normalize=True)
    partial.rename(folder)
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def make_inputs(n: int, seed: int, tokenizer_path: str) -> tuple[list[str], list[int], int]:
    """`n` distinct instruction + query texts, their token counts, and the shared prefix length.

    The queries are the corpus's 5-20-token queries (its passages are dropped). The prefix is the
    tokens every input starts with: [CLS] and the instruction (the radix cache's best case).
    """
    tok = load_tokenizer(tokenizer_path)
    texts = make_corpus(2 * n + 64, seed, tokenizer_path)
    queries = [t for t, c in zip(texts, count_tokens(tok, texts), strict=True) if c <= QUERY_TOKENS[1]]
    inputs = [INSTRUCTION + q for q in dict.fromkeys(queries)][:n]
    ids = [e.ids for e in tok.encode_batch(inputs)]
    head = tok.encode(INSTRUCTION).ids
    prefix = min(_common(x, head) for x in ids)
    return inputs, [len(x) for x in ids], prefix


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- one phase: closed-loop load that never repeats an input ---------------------------------


@dataclass
class Phase:
    label: str
    seconds: float = 0.0  # the measured window
    requests: int = 0  # answered 200 inside the window
    inputs: int = 0
    tokens: int = 0  # counted by the client's tokenizer, instruction included
    server_tokens: int = 0  # usage.prompt_tokens of the same responses (a cross-check)
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    exhausted: bool = False  # ran out of distinct inputs before the window closed
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def rate(self, n: float) -> float:
        return n / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def drive(url: str, model: str, inputs: list[str], tokens: list[int], a, label: str) -> Phase:
    """`a.concurrency` clients, `a.inputs_per_request` fresh inputs each time, warmup then window.

    NOTE: inputs are handed out in order and never reused, so no input is ever in the radix tree
    whole; the walk (and the run) ends early if they run out (`exhausted`).
    """
    ph, state = Phase(label), {"next": 0}
    t0 = time.perf_counter()
    start, end = t0 + a.warmup, t0 + a.warmup + a.duration

    async def client() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=a.timeout, trust_env=False) as http:
            while time.perf_counter() < end:
                lo = state["next"]
                if lo + a.inputs_per_request > len(inputs):
                    ph.exhausted = True
                    return
                state["next"] = lo + a.inputs_per_request  # single event loop: no lock needed
                batch = range(lo, lo + a.inputs_per_request)
                began = time.perf_counter()
                outcome, usage = await _post(http, model, [inputs[i] for i in batch])
                ended = time.perf_counter()
                if start <= ended <= end:
                    _record(ph, outcome, usage, sum(tokens[i] for i in batch), len(batch), ended - began)

    await asyncio.gather(*(client() for _ in range(a.concurrency)))
    ph.seconds = max(min(time.perf_counter(), end) - start, 0.0)
    return ph


async def _post(http: httpx.AsyncClient, model: str, texts: list[str]) -> tuple[str, dict]:
    try:
        resp = await http.post("/v1/embeddings", json={"model": model, "input": texts})
    except httpx.HTTPError as exc:
        return type(exc).__name__, {}
    if resp.status_code != 200:
        return str(resp.status_code), {}
    try:
        body = _loads(resp.content)
        ok = len(body["data"]) == len(texts)
        return ("ok" if ok else "bad_response"), body["usage"]
    except (ValueError, KeyError, TypeError):
        return "bad_response", {}


def _record(ph: Phase, outcome: str, usage: dict, tokens: int, inputs: int, seconds: float) -> None:
    if outcome != "ok":
        ph.errors[outcome] = ph.errors.get(outcome, 0) + 1
        return
    ph.requests += 1
    ph.inputs += inputs
    ph.tokens += tokens
    ph.server_tokens += usage["prompt_tokens"]
    ph.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
    ph.latencies_ms.append(seconds * 1e3)


def embed_each(url: str, model: str, texts: list[str], timeout: float) -> np.ndarray:
    """One request per text, one after another, so each meets the cache as a lone query would."""
    rows = []
    with httpx.Client(base_url=url, timeout=timeout, trust_env=False) as http:
        for text in texts:
            resp = http.post("/v1/embeddings", json={"model": model, "input": [text]})
            resp.raise_for_status()
            rows.append(resp.json()["data"][0]["embedding"])
    return np.asarray(rows, dtype=np.float64)


def run_phase(
    a, label: str, extra: list[str], inputs, tokens, sample, log_path: Path
) -> tuple[Phase, np.ndarray]:
    port = free_port()
    cmd = [*server_command(port, a.model_path, a.dtype), "--embedding-cache-size", "0", *extra]
    if a.tokenizer_path:
        cmd += ["--tokenizer-path", a.tokenizer_path]
    print(f"[{label}] starting {' '.join(cmd)}\n  log: {log_path}", file=sys.stderr)
    with running_server(cmd, port, log_path, a.ready_timeout) as url:
        model = first_model(url)
        phase = asyncio.run(drive(url, model, inputs, tokens, a, label))
        return phase, embed_each(url, model, sample, a.timeout)


# ---- report -----------------------------------------------------------------------------------


def agreement(on: np.ndarray, off: np.ndarray) -> dict[str, float]:
    """Cosine of each input's two embeddings, and, for scale, between different inputs."""
    on = on / np.linalg.norm(on, axis=1, keepdims=True)
    off = off / np.linalg.norm(off, axis=1, keepdims=True)
    same = (on * off).sum(axis=1)
    cross = off @ off.T
    others = cross[~np.eye(len(off), dtype=bool)]
    return {
        "min_cosine": float(same.min()),
        "mean_cosine": float(same.mean()),
        "distinct_inputs_mean_cosine": float(others.mean()),
    }


def summarise(on: Phase, off: Phase, prefix: int, agree: dict[str, float]) -> dict:
    mean_tokens = on.tokens / on.inputs if on.inputs else float("nan")
    share = on.cached_tokens / on.server_tokens if on.server_tokens else 0.0
    return {
        "prefix_tokens": prefix,
        "mean_input_tokens": mean_tokens,
        "measured_ratio": on.rate(on.tokens) / off.rate(off.tokens) if off.tokens else float("nan"),
        "expected_ratio": mean_tokens / (mean_tokens - prefix),  # (prefix + query) / query
        "ratio_from_cached_share": 1 / (1 - share) if share < 1 else float("inf"),
        "agreement": agree,
        "agrees": agree["min_cosine"] >= AGREEMENT,
    }


def format_markdown(on: Phase, off: Phase, s: dict, a) -> str:
    def row(name: str, f, fmt: str) -> str:
        x, y = f(on), f(off)
        ratio = f"{x / y:.2f}x" if y else "n/a"
        return f"| {name} | {x:{fmt}} | {y:{fmt}} | {ratio} |"

    def share(p: Phase) -> float:
        return p.cached_tokens / p.server_tokens if p.server_tokens else 0.0

    ag = s["agreement"]
    lines = [
        f"model {a.model_path}, dtype {a.dtype}; {a.concurrency} clients x "
        f"{a.inputs_per_request} inputs/request, {a.warmup:.0f} s warmup + {a.duration:.0f} s measured per "
        f"server; --embedding-cache-size 0 on both; cpus {os.cpu_count()}",
        "",
        "| | radix cache on | `--disable-radix-cache` | on / off |",
        "|---|---:|---:|---:|",
        row("tokens/s (client-counted, instruction included)", lambda p: p.rate(p.tokens), ",.0f"),
        row(
            "computed tokens/s (prompt - cached)", lambda p: p.rate(p.server_tokens - p.cached_tokens), ",.0f"
        ),
        row("inputs/s", lambda p: p.rate(p.inputs), ",.1f"),
        row("cached share of prompt tokens", share, ".1%"),
        row("latency p50 ms", lambda p: p.pct(50), ",.0f"),
        row("latency p99 ms", lambda p: p.pct(99), ",.0f"),
        f"| inputs answered in the window | {on.inputs:,} | {off.inputs:,} | |",
        f"| errors | {on.errors or 0} | {off.errors or 0} | |",
        "",
        f"measured ratio {s['measured_ratio']:.2f}x; expected (prefix + query) / query = "
        f"{s['mean_input_tokens']:.1f} / {s['mean_input_tokens'] - s['prefix_tokens']:.1f} = "
        f"{s['expected_ratio']:.2f}x (prefix {s['prefix_tokens']} tokens: [CLS] + instruction); "
        f"1 / (1 - cached share) = {s['ratio_from_cached_share']:.2f}x",
        f"embeddings on vs off: cosine min {ag['min_cosine']:.6f}, mean {ag['mean_cosine']:.6f} over "
        f"{2 * SAMPLE} inputs ({SAMPLE} sent during the load, {SAMPLE} never sent); different inputs' mean "
        f"cosine {ag['distinct_inputs_mean_cosine']:.3f} -> {'PASS' if s['agrees'] else 'FAIL'} (>= {AGREEMENT})",
    ]
    for p in (on, off):
        if p.exhausted:
            lines.append(f"NOTE: {p.label} ran out of distinct inputs; its window is short (raise --queries)")
        if p.tokens != p.server_tokens:
            lines.append(f"NOTE: {p.label}: client counted {p.tokens} tokens, the server {p.server_tokens}")
    return "\n".join(lines)


# ---- entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="a causal last-token model to use instead of the built one")
    p.add_argument(
        "--tokenizer-path", help="given to the server and used to count tokens (default: see main)"
    )
    p.add_argument(
        "--model-folder", type=Path, default=DEFAULT_FOLDER, help="where the random model is built"
    )
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--inputs-per-request", type=int, default=4)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds driven before measuring, per server")
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured, per server")
    p.add_argument("--queries", type=int, default=6000, help="distinct queries (each sent at most once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--json", action="store_true", help="also save bench/results/prefix-cache-*.json")
    a = p.parse_args(argv)
    if min(a.concurrency, a.inputs_per_request) < 1 or a.queries <= SAMPLE:
        p.error(f"--concurrency and --inputs-per-request must be >= 1, --queries > {SAMPLE}")
    if a.duration <= 0 or a.warmup < 0 or a.timeout <= 0:
        p.error("--duration and --timeout must be > 0 and --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.model_path is None:
        build_model(a.model_folder)
        a.model_path = str(a.model_folder)
        # NOTE: transformers (5.x) loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever
        # tokenizer_config.json says, which splits the MiniLM vocabulary's text into single
        # characters; the server then prefers it over tokenizer.json. Pointing the server at the
        # MiniLM folder itself keeps WordPiece, so the instruction stays ~60 tokens.
        a.tokenizer_path = a.tokenizer_path or bundled_model_path()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    inputs, tokens, prefix = make_inputs(a.queries, a.seed, a.tokenizer_path or a.model_path)
    load, load_tokens = inputs[:-SAMPLE], tokens[:-SAMPLE]
    sample = inputs[:SAMPLE] + inputs[-SAMPLE:]  # the first ones are sent during the load
    print(
        f"{len(inputs)} inputs, shared prefix {prefix} tokens, mean {np.mean(tokens):.1f} tokens",
        file=sys.stderr,
    )
    on, emb_on = run_phase(a, "radix on", [], load, load_tokens, sample, RESULTS / f"prefix-on-{stamp}.log")
    off, emb_off = run_phase(
        a,
        "radix off",
        ["--disable-radix-cache"],
        load,
        load_tokens,
        sample,
        RESULTS / f"prefix-off-{stamp}.log",
    )
    s = summarise(on, off, prefix, agreement(emb_on, emb_off))
    print(format_markdown(on, off, s, a))
    if a.json:
        out = RESULTS / f"prefix-cache-{stamp}.json"
        phases = {
            p.label: {**dataclasses.asdict(p), "p50_ms": p.pct(50), "p99_ms": p.pct(99)} for p in (on, off)
        }
        out.write_text(
            json.dumps({"args": {**vars(a), "model_folder": str(a.model_folder)}, **s, **phases}, indent=2)
        )
        print(f"saved {out}", file=sys.stderr)
    sys.exit(0 if s["agrees"] else 1)


if __name__ == "__main__":
    main()
