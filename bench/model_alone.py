"""The model alone, in this process: what each CPU speed-up of the executor buys, one at a time.

    python -m bench.model_alone [--batch-tokens 3000] [--rounds 5]

Batches of the mixed RAG corpus (half 5-20-token queries, half 50-250-token passages), packed as the
server packs them (about 3,000 tokens, the size its batches reach at 16 clients x 8 inputs), run by
`ModelRunner.embed` with the executor's thread count, in four configurations:

    F.linear + SDPA        plain torch: weights as loaded, SDPA once per sequence
    packed linears + SDPA  weights packed once for oneDNN, bias/GELU/residual fused into the GEMMs
    F.linear + C kernel    embedserve's attention kernel, one call per layer
    packed + C kernel      what the server runs

in the executor's environment (GOMP_SPINCOUNT from the launcher), and against the same texts
through `transformers` BertModel, sorted by length and padded per
mini-batch of 32 (the usual way). Rounds interleave the configurations and each reports its best
round: the machine is shared and noisy, so compare the columns of one run.
"""

from __future__ import annotations

import argparse
import sys
import time

from embedserve.launch import set_child_env_defaults

# NOTE: the executor's environment (GOMP_SPINCOUNT among it), set before torch loads libgomp.
set_child_env_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from embedserve.bench.corpus import bundled_model_path, load_tokenizer, make_corpus  # noqa: E402
from embedserve.gpu_proc.model_runner import ModelRunner  # noqa: E402
from embedserve.model_config import load_model_config  # noqa: E402
from embedserve.server_args import ServerArgs  # noqa: E402

CONFIGS = {
    "F.linear + SDPA": dict(pack_linears=False, attention_backend="torch"),
    "packed linears + SDPA": dict(pack_linears=True, attention_backend="torch"),
    "F.linear + C kernel": dict(pack_linears=False, attention_backend="cpu"),
    "packed + C kernel (the server)": dict(pack_linears=True, attention_backend="cpu"),
}


def batches(ids: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    out, cur, n = [], [], 0
    for seq in ids:
        cur.append(seq)
        n += len(seq)
        if n >= batch_tokens:
            out.append(cur)
            cur, n = [], 0
    return out


def run_embedserve(runner: ModelRunner, work: list[list[list[int]]]) -> float:
    started, tokens = time.perf_counter(), 0
    for batch in work:
        runner.embed(np.concatenate([np.asarray(s, np.int32) for s in batch]), [len(s) for s in batch])
        tokens += sum(map(len, batch))
    return tokens / (time.perf_counter() - started)


def run_transformers(model, work: list[list[list[int]]], mini: int) -> float:
    started, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in work:
            seqs = sorted(batch, key=len)
            for i in range(0, len(seqs), mini):
                part = seqs[i : i + mini]
                width = max(map(len, part))
                ids = torch.zeros((len(part), width), dtype=torch.long)
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for row, s in enumerate(part):
                    ids[row, : len(s)] = torch.tensor(s)
                    mask[row, : len(s)] = 1
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            tokens += sum(map(len, batch))
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--batch-tokens", type=int, default=3000)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    threads = ServerArgs(model_path=a.model_path).executor_threads
    torch.set_num_threads(threads)
    tok = load_tokenizer(a.model_path)
    ids = [tok.encode(t).ids for t in make_corpus(4000, 0, a.model_path)]
    work = batches(ids, a.batch_tokens)[: a.batches]
    from transformers import AutoModel

    rows = {}
    for dtype in ("float32", "bfloat16"):
        runners = {
            name: ModelRunner(load_model_config(a.model_path), "cpu", dtype, num_threads=threads, **kw)
            for name, kw in CONFIGS.items()
        }
        hf = AutoModel.from_pretrained(a.model_path, torch_dtype=getattr(torch, dtype)).eval()
        best = {name: 0.0 for name in [*runners, "transformers, padded per 32"]}
        for runner in runners.values():
            run_embedserve(runner, work[:1])  # warm-up: oneDNN primitives, the kernel build
        for _ in range(a.rounds):
            for name, runner in runners.items():
                best[name] = max(best[name], run_embedserve(runner, work))
            best["transformers, padded per 32"] = max(
                best["transformers, padded per 32"], run_transformers(hf, work, 32)
            )
            print(f"{dtype}: " + ", ".join(f"{k} {v:,.0f}" for k, v in best.items()), file=sys.stderr)
        rows[dtype] = best
        del runners, hf
    tokens = sum(len(s) for b in work for s in b)
    print(
        f"### The model alone (`python -m bench.model_alone`), {threads} threads, torch {torch.__version__}\n"
    )
    print(
        f"{len(work)} batches, {tokens:,} tokens (~{tokens // len(work):,} per batch), best of {a.rounds} rounds\n"
    )
    print("| configuration | fp32 tokens/s | bf16 tokens/s |\n|---|---:|---:|")
    base = rows["float32"]["F.linear + SDPA"], rows["bfloat16"]["F.linear + SDPA"]
    for name in rows["float32"]:
        f, b = rows["float32"][name], rows["bfloat16"][name]
        print(f"| {name} | {f:,.0f} ({f / base[0]:.2f}x) | {b:,.0f} ({b / base[1]:.2f}x) |")


if __name__ == "__main__":
    main()
