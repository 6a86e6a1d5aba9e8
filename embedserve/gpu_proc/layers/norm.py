"""RMSNorm as Llama and Qwen use it, fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from embedserve.kernels import fused_add_rmsnorm, rmsnorm


class RMSNorm(nn.Module):
    """`forward(x)` -> rmsnorm(x); `forward(x, residual)` -> (rmsnorm(x + residual), x + residual).

    The fused form is the pre-norm residual stream of a decoder layer: the sum is the next residual.
    NOTE: normalises the last dim, so a [tokens, heads, head_dim] input is normed per head (Qwen3 q/k).
    """

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rmsnorm(x, self.weight, self.eps)
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)
