"""How many CPU threads one batch runs on: all of the executor's, or one for a batch too small to share.

Measured on 2 Zen 4 vCPUs, all-MiniLM-L6-v2 fp32, one 10-token query: back to back, two threads take
4.7-5.6 ms and one 6-6.5 ms; but once the server has been idle for ~50 ms, two threads take ~30 ms and
one ~8. Every parallel region of the forward (a GEMM, a LayerNorm) then waits ~0.5 ms for the second
OpenMP thread, whose vCPU the hypervisor has descheduled, and a small batch's regions are far shorter
than that wait. From ~64 MiniLM tokens on, each region holds enough work that two threads win both
back to back and after a pause (64 tokens: 14 vs 20 ms back to back, 17 vs 20 after 50 ms idle).

The rule is in work per layer, not tokens, so it carries to other models: a 10-token query to a
1.5B-parameter model holds ~25x MiniLM's 64-token work per layer and keeps every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# A batch below this many multiply-adds x 2 per layer (linear layers only) runs on one thread:
# 45 tokens of MiniLM (3.5 MFLOP per token per layer).
SERIAL_LAYER_FLOPS = 1.6e8


def batch_threads(num_tokens: int, flops_per_token_per_layer: float, max_threads: int) -> int:
    """Threads for a batch of `num_tokens`: 1 when its layers are too small to share, else all."""
    if num_tokens * flops_per_token_per_layer < SERIAL_LAYER_FLOPS:
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
