"""One batch at a time on every thread, against two at a time on their share each (the executor's
lanes, `--concurrent-batches 2`), in-process, with and without a bursty neighbour process.

    python -m bench.concurrent_batches [--batch-tokens 600] [--seconds 10] [--rounds 3]

Each configuration runs in a child process of its own (libgomp keeps a worker pool per thread that
ran OpenMP, so configurations must not share a process) through the executor's own `Lanes` and
`ModelRunner`, on batches of the mixed RAG corpus. The neighbour stands in for the HTTP, tokenizer
and output processes and the clients under load: a process busy `--busy-ms` of every `--period-ms`
(default 2 of 10: 20 % of a core in bursts). Rounds interleave the configurations; the table gives
the median of the rounds and the ratio two lanes / one lane within each neighbour setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(lanes: int, dtype: str, batch_tokens: int, seconds: float) -> float:
    """Tokens/s of `lanes` lanes over the corpus for `seconds`, in this process."""
    from embedserve.launch import set_child_env_defaults

    set_child_env_defaults()  # NOTE: before torch loads libgomp, as in the executor
    import numpy as np
    import torch

    from bench.model_alone import batches
    from embedserve.bench.corpus import bundled_model_path, load_tokenizer, make_corpus
    from embedserve.gpu_proc.lanes import Job, Lanes
    from embedserve.gpu_proc.model_runner import ModelRunner
    from embedserve.messages import ForwardBatch
    from embedserve.model_config import load_model_config

    path = str(bundled_model_path())
    tokenizer = load_tokenizer(path)
    ids = [tokenizer.encode(t).ids for t in make_corpus(4000, 0, path)]
    work = [
        (np.concatenate([np.asarray(s, np.int32) for s in b]), [len(s) for s in b])
        for b in batches(ids, batch_tokens)
    ]
    threads = torch.get_num_threads()
    runner = ModelRunner(
        load_model_config(path), "cpu", dtype, num_threads=threads, build_threads=1 if lanes > 1 else None
    )
    runner.embed(*work[0])

    tokens = [0]

    def run(job: Job) -> None:
        batch_ids, lens = work[job.batch.batch_id % len(work)]
        runner.embed(batch_ids, lens)
        tokens[0] += len(batch_ids)

    pool = Lanes(lanes, run, on_start=lambda n: runner.core_share.enter_lane(n, lanes))
    started, n, in_flight = time.perf_counter(), 0, []
    while time.perf_counter() - started < seconds:
        in_flight.append(pool.submit(ForwardBatch(batch_id=n, seqs=[]), n))
        n += 1
        while len(in_flight) >= lanes:  # keep every lane fed, as the scheduler does
            in_flight.pop(0).done.wait()
    for job in in_flight:
        job.done.wait()
    return tokens[0] / (time.perf_counter() - started)


def neighbour(busy_ms: float, period_ms: float) -> subprocess.Popen:
    code = (
        "import time\n"
        "while True:\n"
        "    t = time.perf_counter()\n"
        f"    while time.perf_counter() - t < {busy_ms / 1000}: pass\n"
        f"    time.sleep({(period_ms - busy_ms) / 1000})\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch-tokens", type=int, default=600, help="tokens per batch (16 x 1 makes ~600)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy-ms", type=float, default=2.0)
    p.add_argument("--period-ms", type=float, default=10.0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.dtype, a.batch_tokens, a.seconds)))
        return
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(a.rounds):
        for busy in (False, True):
            for lanes in (1, 2) if r % 2 == 0 else (2, 1):
                hog = neighbour(a.busy_ms, a.period_ms) if busy else None
                try:
                    cmd = [sys.executable, "-m", "bench.concurrent_batches", "--child", str(lanes)]
                    cmd += [
                        "--dtype",
                        a.dtype,
                        "--batch-tokens",
                        str(a.batch_tokens),
                        "--seconds",
                        str(a.seconds),
                    ]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                tps = float(out.strip().splitlines()[-1])
                key = (
                    f"neighbour busy {a.busy_ms:g} of {a.period_ms:g} ms" if busy else "no neighbour",
                    lanes,
                )
                results.setdefault(key, []).append(tps)
                print(
                    f"round {r + 1}/{a.rounds}, {key[0]}, {lanes} lane(s): {tps:,.0f} tokens/s",
                    file=sys.stderr,
                )
    print(f"\n{a.dtype}, batches of ~{a.batch_tokens} tokens, {a.rounds} rounds x {a.seconds:g} s\n")
    print("| neighbour | one batch at a time | two at a time | two / one |")
    print("|---|---:|---:|---:|")
    for setting in dict.fromkeys(k[0] for k in results):
        one, two = (statistics.median(results[(setting, n)]) for n in (1, 2))
        print(f"| {setting} | {one:,.0f} | {two:,.0f} | **{two / one:.2f}x** |")


if __name__ == "__main__":
    main()
