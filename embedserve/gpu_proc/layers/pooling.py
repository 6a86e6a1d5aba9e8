"""One vector per sequence from the last hidden states of a packed batch."""

from __future__ import annotations

import torch

from embedserve.kernels import pool_normalize

POOLING_MODES = ("cls", "mean", "last")


class Pooler:
    """Pools [tokens, hidden] into float32 [num_seqs, hidden], then L2-normalises if asked.

    NOTE: `kernels.pool_normalize` does both in one Triton launch on CUDA (its torch reference on CPU);
    mean sums in float32, since a bf16 sum over hundreds of tokens loses digits we can keep.
    """

    def __init__(self, mode: str, normalize: bool):
        if mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling {mode!r}; choose one of {sorted(POOLING_MODES)}")
        self.mode = mode
        self.normalize = normalize

    def __call__(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return pool_normalize(hidden, cu_seqlens, self.mode, self.normalize)
