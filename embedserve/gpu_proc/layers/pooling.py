"""One vector per sequence from the last hidden states of a packed batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _cls(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return hidden[cu_seqlens[:-1].long()]


def _last(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return hidden[cu_seqlens[1:].long() - 1]


def _mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    # NOTE: sum in float32: a bf16 sum over hundreds of tokens loses digits we can keep.
    hidden = hidden.float()
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_of_token = torch.repeat_interleave(
        torch.arange(len(lens), device=hidden.device), lens, output_size=hidden.shape[0]
    )
    sums = hidden.new_zeros(len(lens), hidden.shape[1]).index_add_(0, seq_of_token, hidden)
    return sums / lens.unsqueeze(1).to(hidden.dtype)


_POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": _cls,
    "mean": _mean,
    "last": _last,
}


class Pooler:
    """Pools [tokens, hidden] into float32 [num_seqs, hidden], then L2-normalises if asked."""

    def __init__(self, mode: str, normalize: bool):
        if mode not in _POOLERS:
            raise ValueError(f"unknown pooling {mode!r}; choose one of {sorted(_POOLERS)}")
        self.mode = mode
        self.normalize = normalize
        self._pool = _POOLERS[mode]

    def __call__(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        pooled = self._pool(hidden, cu_seqlens).float()
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled
