"""The CPU attention kernel against torch's SDPA (the fallback) and, optionally, against the kernel's
source at another git revision, on the batch shape the server runs.

    python -m bench.attention_kernel [--baseline-rev HEAD~1] [--inputs 40] [--rounds 7]

One layer's attention for a batch of the mixed RAG corpus (40 inputs, ~3-4k tokens: the size of a
batch at 16 clients x 8 inputs), all-MiniLM-L6-v2's shape (12 heads of 32), q, k and v as strided
views of one fused qkv tensor as the model produces them; 2 threads (the executor's). Rounds interleave
the contenders and each reports its best round (the machine is noisy); outputs are checked equal.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from embedserve.launch import set_child_env_defaults

# NOTE: the executor's environment (GOMP_SPINCOUNT among it), set before torch loads libgomp.
set_child_env_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from embedserve.bench.corpus import bundled_model_path, load_tokenizer, make_corpus  # noqa: E402
from embedserve.kernels.cpu_attention import SOURCE, compile_kernel, cpu_attention, load_kernel  # noqa: E402

HEADS, HEAD_DIM, MAX_LEN = 12, 32, 256


def sdpa_per_sequence(q, k, v, cu: np.ndarray) -> torch.Tensor:
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        out[a:b] = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ).transpose(0, 1)
    return out


def baseline_library(rev: str, workdir: Path):
    repo = SOURCE.parents[2]
    relative = SOURCE.relative_to(repo)
    source = workdir / "baseline.c"
    source.write_bytes(subprocess.run(["git", "show", f"{rev}:{relative}"], cwd=repo, check=True,
                                      capture_output=True).stdout)  # fmt: skip
    target = workdir / "baseline.so"
    compile_kernel(source, target)
    return load_kernel(target)


def mean_ms(fn, calls: int = 10) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e3


def table_row(dtype: torch.dtype, cu: np.ndarray, baseline, rounds: int) -> str:
    torch.manual_seed(0)
    qkv = torch.randn(int(cu[-1]), 3, HEADS, HEAD_DIM).to(dtype)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    scale = HEAD_DIM**-0.5
    contenders = {
        "sdpa": lambda: sdpa_per_sequence(q, k, v, cu),
        "kernel": lambda: cpu_attention(q, k, v, cu, scale, False),
    }
    if baseline:
        contenders["baseline"] = lambda: cpu_attention(q, k, v, cu, scale, False, library=baseline)
        if not torch.equal(contenders["kernel"](), contenders["baseline"]()):
            print(f"NOTE: {dtype}: the kernel's output differs from the baseline's")
    for fn in contenders.values():  # warm-up
        fn()
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):  # interleaved: a slow minute of the machine hits every contender
        for name, fn in contenders.items():
            best[name] = min(best[name], mean_ms(fn))
    row = f"| {str(dtype).removeprefix('torch.')} | {best['sdpa']:.2f} | {best['kernel']:.2f} |"
    row += f" {best['sdpa'] / best['kernel']:.2f}x |"
    if baseline:
        row += f" {best['baseline']:.2f} | {best['baseline'] / best['kernel']:.2f}x |"
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", help="also time the kernel source at this git revision")
    p.add_argument("--inputs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    path = bundled_model_path()
    tok = load_tokenizer(path)
    lens = [min(len(tok.encode(t).ids), MAX_LEN) for t in make_corpus(a.inputs * 4, 0, path)[: a.inputs]]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = int(cu[-1])
    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_library(a.baseline_rev, Path(tmp)) if a.baseline_rev else None
        print(
            f"### One layer's attention, {a.inputs} inputs, {tokens:,} tokens, {HEADS}x{HEAD_DIM}, 2 threads\n"
        )
        head = "| dtype | SDPA per sequence ms | kernel ms | SDPA / kernel |"
        head += f" kernel at {a.baseline_rev} ms | speed-up |" if baseline else ""
        print(head)
        print("|---" * (head.count("|") - 1) + "|")
        for dtype in (torch.float32, torch.bfloat16):
            print(table_row(dtype, cu, baseline, a.rounds))
    print(
        f"\n`python -m bench.attention_kernel{' --baseline-rev ' + a.baseline_rev if a.baseline_rev else ''}`"
    )


if __name__ == "__main__":
    main()
