"""How many token slots the KV pool gets: --max-total-tokens, else a share of GPU memory, else a CPU default."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CPU_DEFAULT_TOKENS = 32768


def kv_pool_tokens(
    max_total_tokens: int | None, mem_fraction: float, device: str, bytes_per_token: int
) -> int:
    if max_total_tokens is not None:
        return max_total_tokens
    if device != "cuda":
        return CPU_DEFAULT_TOKENS
    import torch

    free, total = torch.cuda.mem_get_info()
    # NOTE: the weights are already loaded, so "in use" counts them: the pool takes what the fraction leaves.
    budget = total * mem_fraction - (total - free)
    if budget <= 0:
        raise ValueError(
            f"--mem-fraction-static {mem_fraction} leaves no room for a KV pool after the weights; raise it"
        )
    return int(budget // bytes_per_token)
