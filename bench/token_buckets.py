"""CPU batches at a rounded-up token count against batches at their exact count, in this process.

    python -m bench.token_buckets [--dtype bfloat16|float32] [--inputs 1,4,8,16,64] [--batches 40] [--rounds 3]
    python -m bench.token_buckets --one-sequence 5,10,17,24,40,70,100,150,200 [--dtype ...] [--rounds 4]

Each batch draws its inputs at random from the mixed RAG corpus (half 5-20-token queries, half
50-250-token passages, cut at 256), so its token count changes from batch to batch as in the server.
`ModelRunner.embed` runs them with the executor's thread count, once with `round_token_counts` on
(what the server runs: gpu_proc/token_buckets.py) and once off. Both modes first run `--batches`
batches unmeasured, so each meets its steady state (the rounded one has met most of its sizes; the
exact one has whatever oneDNN's cache kept), then the rounds alternate the modes, each on batches of
its own. One process and one oneDNN cache serve both: a size either mode built may serve the other.

`--one-sequence M,...`: the latency of one sequence of M tokens (a short query, a passage) at the
size the server runs it at, against M rounded up to a multiple of 16, the floor the rounding first had
(emulated with a dummy sequence, as the server pads); every size is built before it is timed.
"""

from __future__ import annotations

import argparse
import random
import sys

from embedserve.launch import set_child_env_defaults

# NOTE: the executor's environment (GOMP_SPINCOUNT among it), set before torch loads libgomp.
set_child_env_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.model_alone import run_embedserve  # noqa: E402
from embedserve.bench.corpus import bundled_model_path, load_tokenizer, make_corpus  # noqa: E402
from embedserve.bench.one_at_a_time import one_at_a_time  # noqa: E402
from embedserve.gpu_proc.model_runner import ModelRunner  # noqa: E402
from embedserve.gpu_proc.token_buckets import padded_token_count  # noqa: E402
from embedserve.model_config import load_model_config  # noqa: E402
from embedserve.server_args import ServerArgs  # noqa: E402

MODES = {"rounded (the server)": True, "exact": False}


def tokens_per_second(runner: ModelRunner, rounded: bool, work: list[list[list[int]]]) -> float:
    runner.round_token_counts = rounded
    return run_embedserve(runner, work)


def floor_of_16_size(tokens: int) -> int:
    """The size the rounding ran one sequence (at most 256 tokens) at before b436a07."""
    return -(-tokens // 16) * 16


def one_sequence_ms(runner: ModelRunner, tokens: int, floor_of_16: bool) -> float:
    """p50 ms of one forward of a `tokens`-long sequence, as the server runs it or padded to 16s."""
    ids = np.random.default_rng(tokens).integers(1000, 20000, tokens).astype(np.int32)
    lens = [tokens]
    runner.round_token_counts = not floor_of_16
    if floor_of_16 and (pad := floor_of_16_size(tokens) - tokens):
        ids, lens = np.concatenate([ids, np.zeros(pad, np.int32)]), [tokens, pad]
    return float(np.median(one_at_a_time(lambda: runner.embed(ids, lens), 40, warmup=10)))


def compare_one_sequence(runner: ModelRunner, sizes: list[int], rounds: int) -> None:
    print("| tokens | the server runs | ms | a multiple of 16 | ms | server / floor of 16 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tokens in sizes:
        ms: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for floor in (False, True) if r % 2 == 0 else (True, False):
                ms[floor].append(one_sequence_ms(runner, tokens, floor))
        server, floor16 = np.median(ms[False]), np.median(ms[True])
        print(
            f"| {tokens} | {padded_token_count(tokens)} | {server:.2f} | {floor_of_16_size(tokens)} | {floor16:.2f} "
            f"| **{server / floor16:.2f}** |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--inputs", default="1,4,8,16,64", help="inputs per batch, one row each")
    p.add_argument("--batches", type=int, default=40, help="batches per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one-sequence", help="token counts: one sequence each, the server's size against 16s")
    a = p.parse_args(argv)
    threads = ServerArgs(model_path=a.model_path).executor_threads
    tok = load_tokenizer(a.model_path)
    corpus = [tok.encode(t).ids[:256] for t in make_corpus(4000, 0, a.model_path)]
    runner = ModelRunner(load_model_config(a.model_path), "cpu", a.dtype, num_threads=threads)
    rng = random.Random(0)

    def draw(inputs: int) -> list[list[list[int]]]:
        return [rng.sample(corpus, inputs) for _ in range(a.batches)]

    print(
        f"### Batch token counts rounded up or exact ({a.dtype}, {threads} threads, torch {torch.__version__})\n"
    )
    print(f"`{' '.join(['python -m bench.token_buckets', *sys.argv[1:]])}`\n")
    if a.one_sequence:
        compare_one_sequence(runner, [int(n) for n in a.one_sequence.split(",")], a.rounds)
        return
    print(f"{a.batches} batches per mode and round, {a.rounds} rounds; tokens/s, median of rounds\n")
    print("| inputs per batch | mean tokens | rounded (the server) | exact | rounded / exact | rounds |")
    print("|---:|---:|---:|---:|---:|---|")
    for inputs in (int(n) for n in a.inputs.split(",")):
        for rounded in MODES.values():  # NOTE: the steady state of each mode, unmeasured
            tokens_per_second(runner, rounded, draw(inputs))
        rates: dict[bool, list[float]] = {True: [], False: []}
        mean_tokens = []
        for r in range(a.rounds):
            for rounded in (True, False) if r % 2 == 0 else (False, True):
                work = draw(inputs)
                mean_tokens.append(sum(len(s) for b in work for s in b) / len(work))
                rates[rounded].append(tokens_per_second(runner, rounded, work))
        ratios = [x / y for x, y in zip(rates[True], rates[False], strict=True)]
        on, off = np.median(rates[True]), np.median(rates[False])
        print(
            f"| {inputs} | {np.mean(mean_tokens):,.0f} | {on:,.0f} | {off:,.0f} | **{np.median(ratios):.2f}x** "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
