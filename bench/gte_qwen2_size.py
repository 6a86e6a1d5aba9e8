"""Size smoke test: `ModelRunner.embed` throughput of a random model shaped like gte-Qwen2-1.5B.

Not a test (it takes minutes) and not a quality check (the weights are random): it shows that a
1.5B-parameter decoder loads and runs, how long loading takes and how many tokens/s it embeds.
The model is built once into `--folder` (bf16 safetensors, ~3.5 GB, sharded) and reused; the
MiniLM tokenizer sits beside it, so ids stay below 30522 (enough for a smoke test).

    python -m bench.gte_qwen2_size [--folder /tmp/gte-qwen2-1.5b-random] [--seconds 30]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from embedserve.bench.corpus import bundled_model_path, load_tokenizer, make_corpus

# gte-Qwen2-1.5B-instruct's config.json, less what the model never reads
GTE_QWEN2_1_5B = dict(
    architectures=["Qwen2ForCausalLM"],
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151646,
    max_position_embeddings=131072,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    use_sliding_window=False,
    tie_word_embeddings=False,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build(folder: Path) -> None:
    """A random Qwen2ForCausalLM at the real size, saved as bf16 with sentence-transformers' files."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    started = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(Qwen2Config(**GTE_QWEN2_1_5B)).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(Path(bundled_model_path()) / name, folder / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 1536, "pooling_mode_lasttoken": True})
    )
    print(f"built {folder} in {time.perf_counter() - started:.0f} s")


def batches(folder: Path, batch_tokens: int) -> list[list[list[int]]]:
    """The bench corpus, tokenised and packed greedily into batches of at most `batch_tokens`."""
    tok = load_tokenizer(folder)
    seqs = [e.ids for e in tok.encode_batch(make_corpus(2000, seed=0, tokenizer_path=folder))]
    out: list[list[list[int]]] = [[]]
    for ids in seqs:
        if out[-1] and sum(map(len, out[-1])) + len(ids) > batch_tokens:
            out.append([])
        out[-1].append(ids)
    return out


def measure(
    folder: Path, dtype: str, work: list[list[list[int]]], seconds: float, threads: int | None
) -> dict[str, float]:
    from embedserve.gpu_proc.model_runner import ModelRunner
    from embedserve.model_config import load_model_config

    started = time.perf_counter()
    runner = ModelRunner(load_model_config(str(folder)), device="cpu", dtype=dtype, num_threads=threads)
    load_s = time.perf_counter() - started
    _embed(runner, [work[0][0]])  # warm-up: one short sequence
    tokens, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        tokens += _embed(runner, work[i % len(work)])
        i += 1
    elapsed = time.perf_counter() - started
    del runner
    gc.collect()
    return {"load_s": load_s, "batches": i, "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def _embed(runner, seqs: list[list[int]]) -> int:
    rows = runner.embed(np.concatenate([np.asarray(s, np.int32) for s in seqs]), [len(s) for s in seqs])
    assert rows.shape == (len(seqs), runner.hidden_size) and np.isfinite(rows).all()
    return sum(map(len, seqs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", type=Path, default=Path("/tmp/gte-qwen2-1.5b-random"))
    parser.add_argument("--seconds", type=float, default=30.0, help="measured time per dtype")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice). NOTE: on a shared machine, 1 thread can beat 2: "
        "every parallel op waits for its slowest thread, and a busy core makes that one slow",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.folder / "config.json").is_file():
        args.folder.mkdir(parents=True, exist_ok=True)
        build(args.folder)
    work = batches(args.folder, args.batch_tokens)
    threads = args.threads or torch.get_num_threads()
    print(f"{len(work)} batches of <= {args.batch_tokens} tokens, {threads} threads")
    results = {dtype: measure(args.folder, dtype, work, args.seconds, threads) for dtype in args.dtypes}
    print(f"\n{'dtype':<10}{'load s':>8}{'batches':>9}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}")
    for dtype, r in results.items():
        print(
            f"{dtype:<10}{r['load_s']:>8.1f}{r['batches']:>9d}{r['tokens']:>9d}{r['seconds']:>9.1f}{r['tok_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
