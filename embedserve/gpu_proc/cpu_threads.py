"""How many CPU threads one batch runs on: all of the executor's, or one for a small batch after a pause.

Measured on 2 Zen 4 vCPUs, all-MiniLM-L6-v2 fp32, one 10-token query, by the pause before it: up to
10 ms, two threads take 4.7-6.2 ms and one 6.0-7.2; from ~20 ms the two cross, and after 50 ms two
threads take 26-33 ms against one's 7-9. Every parallel region of the forward (a GEMM, a LayerNorm)
then waits ~0.5 ms for the second OpenMP thread, whose vCPU the hypervisor has descheduled, and a
small batch's regions are far shorter than that wait. From ~64 MiniLM tokens on, each region holds
enough work that two threads win after any pause (64 tokens: 17 vs 20 ms after 50 ms idle).

The rule is in work per layer, not tokens, so it carries to other models: a 10-token query to a
1.5B-parameter model holds ~25x MiniLM's 64-token work per layer and keeps every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# A batch below this many multiply-adds x 2 per layer (linear layers only) is small: 45 tokens of
# MiniLM (3.5 MFLOP per token per layer).
SERIAL_LAYER_FLOPS = 1.6e8
# A small batch keeps every thread while the previous forward ended at most this long ago.
WARM_GAP_S = 0.010


def batch_threads(num_tokens: int, flops_per_token_per_layer: float, max_threads: int, idle_s: float) -> int:
    """Threads for a batch of `num_tokens` that follows `idle_s` seconds without a forward:
    one for a small batch after a pause, all of them otherwise."""
    if num_tokens * flops_per_token_per_layer < SERIAL_LAYER_FLOPS and idle_s > WARM_GAP_S:
        return 1
    return max_threads


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the block with torch (and so oneDNN and the attention kernel) on `count` threads."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
