"""CPU batches at a rounded-up token count against batches at their exact count, in this process.

    python -m bench.token_buckets [--dtype bfloat16|float32] [--inputs 1,4,8,16,64] [--batches 40] [--rounds 3]

Each batch draws its inputs at random from the mixed RAG corpus (half 5-20-token queries, half
50-250-token passages, cut at 256), so its token count changes from batch to batch as in the server.
`ModelRunner.embed` runs them with the executor's thread count, once with `round_token_counts` on
(what the server runs: gpu_proc/token_buckets.py) and once off. Both modes first run `--batches`
batches unmeasured, so each meets its steady state (the rounded one has met most of its sizes; the
exact one has whatever oneDNN's cache kept), then the rounds alternate the modes, each on batches of
its own. One process and one oneDNN cache serve both: a size either mode built may serve the other.
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
from embedserve.gpu_proc.model_runner import ModelRunner  # noqa: E402
from embedserve.model_config import load_model_config  # noqa: E402
from embedserve.server_args import ServerArgs  # noqa: E402

MODES = {"rounded (the server)": True, "exact": False}


def tokens_per_second(runner: ModelRunner, rounded: bool, work: list[list[list[int]]]) -> float:
    runner.round_token_counts = rounded
    return run_embedserve(runner, work)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(bundled_model_path()))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--inputs", default="1,4,8,16,64", help="inputs per batch, one row each")
    p.add_argument("--batches", type=int, default=40, help="batches per mode and round")
    p.add_argument("--rounds", type=int, default=3)
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
    print(f"`{' '.join(['python -m bench.token_buckets', *sys.argv[1:]])}`")
    print(f"\n{a.batches} batches per mode and round, {a.rounds} rounds; tokens/s, median of rounds\n")
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
