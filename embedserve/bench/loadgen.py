"""Closed-loop load generator for a running embedserve (or any OpenAI-compatible embeddings server).

Each of `--concurrency` clients owns one keep-alive connection and sends its next request as soon
as the previous answer arrives. Requests that *complete* inside the measured window (after the
warmup) count; throughput is divided by the window length. Tokens are counted here with the
model's tokenizer, never taken from the server's `usage`, so a server cannot flatter itself.

    python -m embedserve.bench.loadgen --url http://127.0.0.1:30000 --concurrency 16 --inputs-per-request 4
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

from embedserve.bench.corpus import (
    bundled_model_path,
    count_tokens,
    load_corpus_file,
    load_tokenizer,
    make_corpus,
)

try:  # NOTE: the client shares the CPU with the server on small machines; orjson parses ~5x faster.
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads


@dataclass(frozen=True)
class LoadConfig:
    url: str
    model: str
    concurrency: int = 8
    inputs_per_request: int = 1
    warmup: float = 5.0
    duration: float = 30.0
    encoding_format: str = "float"
    timeout: float = 60.0  # seconds per request; also bounds how long the run outlives `duration`
    max_requests: int = 1_000_000
    extra_body: tuple[
        tuple[str, object], ...
    ] = ()  # fields another server needs (vLLM: truncate_prompt_tokens)
    api_key: str | None = None  # sent as "Authorization: Bearer KEY"


@dataclass
class Summary:
    url: str
    model: str
    concurrency: int
    inputs_per_request: int
    encoding_format: str
    seconds: float  # length of the measured window
    requests: int  # successful requests completed in the window
    inputs: int
    tokens: int
    requests_per_s: float
    inputs_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float | None]  # p50 / p90 / p99 / mean of successful requests
    errors: dict[str, int] = field(default_factory=dict)  # HTTP status or exception name -> count
    error_examples: dict[str, str] = field(default_factory=dict)  # ... -> what the first one said
    interrupted: bool = False  # Ctrl-C came during this load: no further load should run
    cut_short: bool = False  # ... before its window ended: the window is what had been measured by then


class _Recorder:
    """Collects outcomes; only those completing inside [start, end] of the window count."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.sent = 0
        self.latencies: list[float] = []
        self.inputs = 0
        self.tokens = 0
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}

    def record(
        self, began: float, ended: float, batch: tuple[list[str], int], outcome: str, detail: str = ""
    ) -> None:
        if not self.start <= ended <= self.end:
            return
        if outcome != "ok":
            self.errors[outcome] += 1
            self.error_examples.setdefault(outcome, detail)
            return
        self.latencies.append(ended - began)
        self.inputs += len(batch[0])
        self.tokens += batch[1]


def _batches(texts: list[str], tokens: list[int], per_request: int) -> Iterator[tuple[list[str], int]]:
    """Endless deterministic walk through the corpus, `per_request` texts at a time."""
    i = 0
    while True:
        idx = [(i + j) % len(texts) for j in range(per_request)]
        yield [texts[k] for k in idx], sum(tokens[k] for k in idx)
        i = (i + per_request) % len(texts)


async def _post(http: httpx.AsyncClient, cfg: LoadConfig, inputs: list[str]) -> tuple[str, str]:
    """One request: "ok", the HTTP status, "bad_response" or the exception's name; and for a
    failure, what went wrong (the server's error message where it sent one)."""
    body = {
        "model": cfg.model,
        "input": inputs,
        "encoding_format": cfg.encoding_format,
        **dict(cfg.extra_body),
    }
    try:
        resp = await http.post("/v1/embeddings", json=body)
    except httpx.HTTPError as exc:
        return type(exc).__name__, str(exc)[:MAX_DETAIL_CHARS]
    if resp.status_code != 200:
        return str(resp.status_code), _error_message(resp.content)
    try:
        ok = len(_loads(resp.content)["data"]) == len(inputs)
    except (ValueError, KeyError, TypeError):
        ok = False
    return ("ok", "") if ok else ("bad_response", f"not {len(inputs)} embeddings: {resp.text[:100]}")


MAX_DETAIL_CHARS = 300


def _error_message(body: bytes) -> str:
    """An OpenAI-style error's message, else the start of the body."""
    try:
        return str(_loads(body)["error"]["message"])[:MAX_DETAIL_CHARS]
    except (ValueError, KeyError, TypeError):
        return body[:MAX_DETAIL_CHARS].decode(errors="replace")


async def _client(cfg: LoadConfig, batches: Iterator[tuple[list[str], int]], rec: _Recorder) -> None:
    # NOTE: one connection per client and keep-alive on, so we measure serving, not TCP handshakes;
    # trust_env=False keeps proxy variables from sending the traffic anywhere but `cfg.url`.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=cfg.url, limits=limits, timeout=cfg.timeout, trust_env=False, headers=auth(cfg.api_key)
    ) as http:
        while time.perf_counter() < rec.end and rec.sent < cfg.max_requests:
            batch = next(batches)  # single event loop: no lock needed around the shared iterator
            rec.sent += 1
            began = time.perf_counter()
            outcome, detail = await _post(http, cfg, batch[0])
            rec.record(began, time.perf_counter(), batch, outcome, detail)
            if not _answered(outcome):  # NOTE: refused or reset: a server that is down is not hammered
                await asyncio.sleep(NO_ANSWER_PAUSE_S)


NO_ANSWER_PAUSE_S = 0.1


def _answered(outcome: str) -> bool:
    """The server answered: "ok", "bad_response" or an HTTP status (not a connection error)."""
    return outcome in ("ok", "bad_response") or outcome.isdigit()


_BAR = "{l_bar}{bar}| {n:.0f}/{total:.0f} s  {postfix}"


async def _progress(rec: _Recorder, t0: float, total: float, enabled: bool) -> None:
    with tqdm(
        total=round(total, 1), disable=not enabled, file=sys.stderr, leave=False, bar_format=_BAR
    ) as bar:
        while True:
            now = time.perf_counter()
            bar.n = round(min(now - t0, total), 1)
            phase = "warmup" if now < rec.start else "measure"
            span = max(now - rec.start, 1e-9)
            bar.set_postfix(
                phase=phase,
                inputs_s=f"{rec.inputs / span:.0f}" if now >= rec.start else "-",
                errors=sum(rec.errors.values()),
            )
            await asyncio.sleep(0.5)


async def run_load(
    cfg: LoadConfig, texts: list[str], tokens: list[int], progress: bool = True, report_ctrl_c: bool = False
) -> Summary:
    """Drives the server for `cfg.warmup + cfg.duration` seconds and summarises the measured part.
    `report_ctrl_c`: Ctrl-C ends the load early and returns it marked `interrupted` (for a caller that
    reports it and stops); otherwise it raises KeyboardInterrupt as usual."""
    t0 = time.perf_counter()
    rec = _Recorder(t0 + cfg.warmup, t0 + cfg.warmup + cfg.duration)
    batches = _batches(texts, tokens, cfg.inputs_per_request)
    ticker = asyncio.create_task(_progress(rec, t0, cfg.warmup + cfg.duration, progress))
    clients = asyncio.gather(*(_client(cfg, batches, rec) for _ in range(cfg.concurrency)))
    stopped_at: list[float] = []  # when Ctrl-C came, if it did
    if report_ctrl_c:
        _stop_on_ctrl_c(clients, stopped_at)
    try:
        await clients
    except asyncio.CancelledError:
        if not stopped_at:
            raise
    finally:
        ticker.cancel()
        if report_ctrl_c:
            _restore_ctrl_c()
    # A run cut short by --max-requests or Ctrl-C has a shorter window than asked for; one stopped
    # in its warm-up has none (seconds == 0). Ctrl-C after the window, while the last answers were
    # awaited, leaves the window whole.
    ended = min(stopped_at[0] if stopped_at else time.perf_counter(), rec.end)
    window = ended - rec.start
    if stopped_at and window <= 0:
        return _summarise(cfg, _Recorder(rec.start, rec.start), 0.0, interrupted=True, cut_short=True)
    cut_short = bool(stopped_at) and stopped_at[0] < rec.end
    return _summarise(cfg, rec, max(window, 1e-9), interrupted=bool(stopped_at), cut_short=cut_short)


def _stop_on_ctrl_c(clients: asyncio.Future, stopped_at: list[float]) -> None:
    """Ctrl-C stops the clients instead of the program, so that what was measured can be reported."""

    def stop() -> None:
        if not stopped_at:
            stopped_at.append(time.perf_counter())
        clients.cancel()

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        pass


def _restore_ctrl_c() -> None:
    try:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
    except (NotImplementedError, RuntimeError, ValueError):
        pass


def _summarise(
    cfg: LoadConfig, rec: _Recorder, window: float, interrupted: bool = False, cut_short: bool = False
) -> Summary:
    lat = np.asarray(rec.latencies) * 1e3
    pct = {f"p{q}": float(np.percentile(lat, q)) if lat.size else None for q in (50, 90, 99)}
    pct["mean"] = float(lat.mean()) if lat.size else None
    return Summary(
        url=cfg.url,
        model=cfg.model,
        concurrency=cfg.concurrency,
        inputs_per_request=cfg.inputs_per_request,
        encoding_format=cfg.encoding_format,
        seconds=window,
        requests=len(rec.latencies),
        inputs=rec.inputs,
        tokens=rec.tokens,
        requests_per_s=len(rec.latencies) / window if window else 0.0,
        inputs_per_s=rec.inputs / window if window else 0.0,
        tokens_per_s=rec.tokens / window if window else 0.0,
        latency_ms=pct,
        errors=dict(sorted(rec.errors.items())),
        error_examples=dict(sorted(rec.error_examples.items())),
        interrupted=interrupted,
        cut_short=cut_short,
    )


def format_summary(s: Summary) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.1f}"

    lat = s.latency_ms
    return "\n".join(
        [
            f"{s.url}  model={s.model}  concurrency={s.concurrency}  inputs/request={s.inputs_per_request}"
            f"  format={s.encoding_format}",
            f"window      {s.seconds:.1f} s   {s.requests} requests, {s.inputs} inputs, {s.tokens} tokens"
            + ("   (cut short by Ctrl-C)" if s.cut_short else ""),
            f"throughput  {s.tokens_per_s:,.0f} tokens/s   {s.inputs_per_s:,.1f} inputs/s   "
            f"{s.requests_per_s:,.1f} requests/s",
            f"latency ms  p50 {ms(lat['p50'])}   p90 {ms(lat['p90'])}   p99 {ms(lat['p99'])}"
            f"   mean {ms(lat['mean'])}",
            f"errors      {describe_errors(s) or 'none'}",
        ]
    )


def describe_errors(s: Summary) -> str:
    """ "948 x 400 (the first: Input 0 has 404 tokens, ...)", one per kind; empty without errors."""
    return "; ".join(
        f"{count} x {kind}"
        + (f" (the first: {s.error_examples[kind]})" if s.error_examples.get(kind) else "")
        for kind, count in s.errors.items()
    )


def auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def first_model(url: str, timeout: float = 10.0, api_key: str | None = None) -> str:
    """The first name that GET /v1/models lists."""
    resp = httpx.get(url.rstrip("/") + "/v1/models", timeout=timeout, trust_env=False, headers=auth(api_key))
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def load_texts(corpus_n: int, corpus_file: str | None, seed: int, tokenizer_path: str) -> list[str]:
    return load_corpus_file(corpus_file) if corpus_file else make_corpus(corpus_n, seed, tokenizer_path)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """Options shared by this script and the side-by-side benchmark."""
    p.add_argument("--concurrency", type=int, default=8, help="clients, each with one connection (default 8)")
    p.add_argument(
        "--inputs-per-request", type=int, default=1, help="texts in each request's input list (default 1)"
    )
    p.add_argument("--warmup", type=float, default=5.0, help="seconds driven before measuring (default 5)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured (default 30)")
    p.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    p.add_argument("--corpus", type=int, default=2000, help="size of the seeded synthetic corpus")
    p.add_argument("--corpus-file", help="texts to send instead: one per line, or JSONL with a 'text' field")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--api-key", help="for a server started with --api-key: sent as a Bearer token")


def load_config(a: argparse.Namespace, url: str, model: str, **overrides: object) -> LoadConfig:
    """The `LoadConfig` that `add_load_args`' options describe; `overrides` replace any of its fields."""
    fields: dict[str, object] = dict(
        url=url, model=model, concurrency=a.concurrency, inputs_per_request=a.inputs_per_request,
        warmup=a.warmup, duration=a.duration, encoding_format=a.encoding_format, timeout=a.timeout,
        max_requests=a.max_requests, api_key=a.api_key,
    )  # fmt: skip
    return LoadConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def check_load_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.concurrency < 1 or a.inputs_per_request < 1 or a.corpus < 1 or a.max_requests < 1:
        p.error("--concurrency, --inputs-per-request, --corpus and --max-requests must be >= 1")
    if a.duration <= 0 or a.warmup < 0 or a.timeout <= 0:
        p.error("--duration and --timeout must be > 0 and --warmup >= 0")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server base URL")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="model folder whose tokenizer counts tokens (default: the bundled all-MiniLM-L6-v2)",
    )
    add_load_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    check_load_args(p, a)
    tokenizer_path = a.tokenizer or bundled_model_path()
    texts = load_texts(a.corpus, a.corpus_file, a.seed, tokenizer_path)
    tokens = count_tokens(load_tokenizer(tokenizer_path), texts)
    cfg = load_config(a, a.url.rstrip("/"), a.model or first_model(a.url, api_key=a.api_key))
    summary = asyncio.run(run_load(cfg, texts, tokens, progress=not a.no_progress, report_ctrl_c=True))
    print(json.dumps(dataclasses.asdict(summary), indent=2) if a.json else format_summary(summary))


if __name__ == "__main__":
    main()
