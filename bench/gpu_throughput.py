"""Throughput of a gte-Qwen2-1.5B-shaped model: the launched server against sentence-transformers, and MFU.

    python -m bench.gpu_throughput [--attention-backend auto] [--duration 15] [--dry-run]

1. Builds (once) the random bf16 model with `bench.gte_qwen2_size.build`.
2. Launches `python -m embedserve.launch --model-path DIR --dtype bfloat16 --attention-backend B`,
   drives it with `embedserve.bench.loadgen` on the mixed corpus (`embedserve.bench.corpus`), and stops it.
3. Only then loads `SentenceTransformer(DIR)` in bf16 on the same card and encodes the same corpus: the
   two phases never overlap.
4. Prints tokens/s of both, their ratio, and each one's model FLOP/s as a fraction of the card's dense
   bf16 peak (MFU), as a block to paste into docs/benchmarks.md.

Model FLOPs per token = 2 x (matmul weights a token passes through: q, k, v, o, gate, up, down of every
layer; embeddings are a lookup and an embedding model has no lm_head) + attention (QK^T and PV: 4 x
head_dim x heads x layers per visible query-key pair, n(n+1)/2 pairs for a causal sequence of n tokens),
averaged over the corpus' token lengths.

Both sides tokenize with the bundled MiniLM tokenizer, which the model folder carries (its ids fit
the vocabulary) and which counts the corpus. NOTE: given that folder alone, transformers 5 builds a
Qwen2Tokenizer from its WordPiece files (config.json says qwen2), which splits the corpus into ~5x
as many tokens as tokenizer.json: the server gets `--tokenizer-path` and sentence-transformers the
tokenizer itself, so that both run the token counts reported here.

--dry-run: a tiny model of the same family, short phases, on whatever device there is: it checks the
script, not the card.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from unittest import mock

from bench.bench_vs_sentence_transformers import RESULTS, run_sentence_transformers
from bench.gte_qwen2_size import GTE_QWEN2_1_5B, build
from embedserve.bench.corpus import bundled_model_path, count_tokens, load_tokenizer, make_corpus
from embedserve.bench.loadgen import LoadConfig, first_model, run_load
from embedserve.bench.server_process import free_port, running_server, server_command

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the first name found in the
# device name wins, so the more specific names come first (a "GH200" also contains "H200").
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
CPU_DEVICE = "cpu (dry run)"
# --dry-run's model: gte-Qwen2's family and layout, tiny. NOTE: the bundled tokenizer's ids stay below 30522.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=30522,
)


def flops_per_token(cfg: dict, lens: list[int], causal: bool = True) -> tuple[float, float]:
    """(matmul, attention) model FLOPs per token, the attention part averaged over `lens`."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads, d = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
    weights = layers * (2 * h * heads * d + 2 * h * kv_heads * d + 3 * h * cfg["intermediate_size"])
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    return 2.0 * weights, 4.0 * d * heads * layers * pairs / sum(lens)


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (given with --peak-tflops)"
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value, f"{value:g} TFLOP/s (the datasheet's dense bf16 for {key}, from the device name)"
    return None, f"unknown for {device_name!r}: pass --peak-tflops"


def measured_gemm_tflops() -> float:
    """An 8192^3 bf16 matrix product on random data, median of 10 after 3 warm-ups: the card's ceiling here."""
    import torch

    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def run_server_phase(a: argparse.Namespace, texts: list[str], tokens: list[int], log: Path):
    port = free_port()
    cmd = [
        *server_command(port, a.model_path, a.dtype),
        *("--attention-backend", a.attention_backend, "--tokenizer-path", bundled_model_path()),
        # NOTE: the corpus repeats within the measured seconds; both caches off, or the server
        # would answer repeats from memory and the figure would not be the model's throughput.
        *("--embedding-cache-size", "0", "--disable-radix-cache"),
    ]
    print(f"starting {' '.join(cmd)}\n  log: {log}", file=sys.stderr)
    with running_server(cmd, port, log, a.ready_timeout) as url:
        cfg = LoadConfig(
            url=url,
            model=first_model(url),
            concurrency=a.concurrency,
            inputs_per_request=a.inputs_per_request,
            warmup=a.warmup,
            duration=a.duration,
            encoding_format="base64",
        )
        summary = asyncio.run(run_load(cfg, texts, tokens, progress=False))
    found = re.search(r"Attention backend: (\w+)", log.read_text(errors="replace"))
    return summary, cmd, found.group(1) if found else "unknown (not in the server log)"


def run_st_phase(a: argparse.Namespace, texts: list[str], tokens: list[int]):
    """`run_sentence_transformers`, its model tokenizing with the MiniLM tokenizer the server was given."""
    import sentence_transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    load = sentence_transformers.SentenceTransformer

    def load_with_tokenizer(path: str):
        model = load(path)
        # NOTE: sentence-transformers >= 6 keeps the tokenizer as the first module's `processor`.
        setattr(model[0], "processor" if hasattr(model[0], "processor") else "tokenizer", tokenizer)
        return model

    with mock.patch.object(sentence_transformers, "SentenceTransformer", load_with_tokenizer):
        return run_sentence_transformers(a, texts, tokens)


def card() -> tuple[str, dict[str, str]]:
    """The device's name and the versions that matter, read after both phases (no CUDA context before)."""
    import torch
    import triton  # type: ignore[import-not-found]

    versions = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        import flashinfer  # type: ignore[import-not-found]

        versions["flashinfer"] = flashinfer.__version__
    except Exception as exc:
        versions["flashinfer"] = f"not usable ({type(exc).__name__})"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else CPU_DEVICE
    return name, versions


def table(es, st, per_token: float, ceilings: list[tuple[str, float]]) -> list[str]:
    """The side-by-side rows, as markdown; MFU = model FLOP/s over each ceiling."""
    both = (es.tokens_per_s, st.tokens_per_s)
    rows = [
        ("tokens/s", *(f"{t:,.0f}" for t in both)),
        ("inputs/s", f"{es.inputs_per_s:,.1f}", f"{st.inputs_per_s:,.1f}"),
        ("model TFLOP/s", *(f"{t * per_token / 1e12:,.1f}" for t in both)),
        *((f"MFU vs {label}", *(f"{t * per_token / 1e12 / c:.1%}" for t in both)) for label, c in ceilings),
    ]
    head = ["| | embedserve | sentence-transformers |", "|---|---:|---:|"]
    return head + [f"| {name} | {x} | {y} |" for name, x, y in rows]


def report(a, cmd, backend, es, st, cfg, lens, device, versions) -> str:
    matmul, attn = flops_per_token(cfg, lens)
    peak, peak_note = peak_tflops(device, a.peak_tflops)
    ceilings = [(f"{peak:g} TFLOP/s peak", peak)] if peak else []
    on_gpu = device != CPU_DEVICE
    if on_gpu:
        gemm = measured_gemm_tflops()
        ceilings.append((f"{gemm:.0f} TFLOP/s measured 8192^3 bf16 GEMM", gemm))
    ratio = es.tokens_per_s / st.tokens_per_s if st.tokens_per_s else float("nan")
    server = " ".join(["python", *cmd[1:]])
    return "\n".join(
        [
            f"### gte-Qwen2-1.5B-shaped model (random weights, {a.dtype}) on {device}",
            "",
            f"- software: {', '.join(f'{k} {v}' for k, v in versions.items())}; attention backend: {backend}",
            f"- server: `{server}` (the MiniLM tokenizer: see bench/gpu_throughput.py)",
            f"- load: embedserve.bench.loadgen, {a.concurrency} clients x {a.inputs_per_request} inputs/request, "
            f"base64, warmup {a.warmup:g} s, measured {es.seconds:.1f} s, errors {sum(es.errors.values())}",
            f"- corpus: {len(lens)} mixed texts (seed 0; queries 5-20, passages 50-250 tokens), "
            f"{sum(lens):,} tokens, mean {sum(lens) / len(lens):.1f}",
            f"- sentence-transformers: SentenceTransformer(folder) with the same tokenizer, .to({a.dtype}), "
            f".encode({a.st_chunk} texts a call, batch_size=32), same corpus and card, after the server "
            f"stopped; measured {st.seconds:.1f} s",
            f"- model FLOPs/token: {(matmul + attn) / 1e9:.4g} G = {matmul / 1e9:.4g} G matmul + "
            f"{attn / 1e9:.4g} G attention (corpus mean, causal)",
            f"- bf16 peak assumed: {peak_note}" if on_gpu else "- MFU: not computed on CPU (dry run)",
            "",
            *table(es, st, matmul + attn, ceilings if on_gpu else []),
            "",
            f"embedserve / sentence-transformers: {ratio:.2f}x tokens/s",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model, short phases, any device")
    p.add_argument("--folder", type=Path, default=None, help="model folder (built there if missing)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flashinfer", "triton", "torch"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--inputs-per-request", type=int, default=16)
    p.add_argument("--warmup", type=float, default=6.0, help="seconds before measuring, each phase")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured, each phase")
    p.add_argument("--corpus", type=int, default=2000)
    p.add_argument("--st-chunk", type=int, default=128, help="texts per SentenceTransformer.encode call")
    p.add_argument("--ready-timeout", type=float, default=240.0)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    a = p.parse_args(argv)
    if a.dry_run:
        a.warmup, a.duration, a.corpus = min(a.warmup, 1.0), min(a.duration, 3.0), min(a.corpus, 200)
        a.concurrency, a.inputs_per_request = min(a.concurrency, 4), min(a.inputs_per_request, 4)
    a.folder = a.folder or Path("/tmp/gte-qwen2-" + ("tiny-random" if a.dry_run else "1.5b-random"))
    a.model_path = str(a.folder)  # NOTE: the name run_sentence_transformers reads
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    # NOTE: gpu_check.sh stops an overlong run with SIGTERM; exiting through SystemExit runs the
    # `running_server` cleanup, where the default handler would leave the server holding the GPU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (a.folder / "config.json").is_file():
        a.folder.mkdir(parents=True, exist_ok=True)
        with mock.patch.dict(GTE_QWEN2_1_5B, TINY if a.dry_run else {}):
            build(a.folder)
    cfg = json.loads((a.folder / "config.json").read_text())
    texts = make_corpus(a.corpus, seed=0, tokenizer_path=a.folder)
    lens = count_tokens(load_tokenizer(a.folder), texts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    es, cmd, backend = run_server_phase(a, texts, lens, RESULTS / f"gpu-server-{stamp}.log")
    print("server phase done; running sentence-transformers", file=sys.stderr)
    st = run_st_phase(a, texts, lens)
    device, versions = card()
    text = report(a, cmd, backend, es, st, cfg, lens, device, versions)
    print(text)
    record = {
        "report": text,
        "embedserve": dataclasses.asdict(es),
        "sentence_transformers": dataclasses.asdict(st),
    }
    for folder in (RESULTS, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
        if folder is not None:
            (folder / f"gpu-throughput-{stamp}.json").write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
