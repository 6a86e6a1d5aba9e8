"""The gated feed-forward block of Llama-style decoders: down(act(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from embedserve.gpu_proc.layers.activation import GatedActivation
from embedserve.gpu_proc.layers.linear import Linear, PackedLinear


class GatedMLP(nn.Module):
    """`gate_up_proj` fuses the checkpoint's `gate_proj` (shard 0) and `up_proj` (shard 1)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.act = GatedActivation(act)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
