"""Linear layers that fuse several checkpoint projections of the same input into one matmul.

The checkpoint keeps `q_proj`, `k_proj`, `v_proj` (or `gate_proj`, `up_proj`) apart; the model holds
one weight whose rows are the shards stacked in order, so one GEMM reads the input once:

    qkv_proj.weight rows:  | q: num_heads * head_dim | k: num_kv_heads * head_dim | v: num_kv_heads * head_dim |

A model's `packed_modules_mapping` names which checkpoint module is which shard; each fused parameter
carries a `weight_loader` that copies a shard into its rows, so shards may differ in size (GQA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embedserve.gpu_proc.layers.activation import get_activation
from embedserve.gpu_proc.layers.onednn import FUSED_ACTIVATIONS, PackedWeight
from embedserve.gpu_proc.weight_loader import set_packed_weight_loader


class Linear(nn.Linear):
    """`nn.Linear`, run on the CPU by a oneDNN-packed weight once `pack_for_cpu` has been called.

    `forward_act` and `forward_add` are the fusions a model asks for by name; each is the same
    arithmetic unfused where no packed weight exists (GPU, or a CPU without oneDNN).
    """

    packed: PackedWeight | None = None

    def pack_for_cpu(self) -> None:
        self.packed = PackedWeight.pack(self.weight, self.bias)
        # NOTE: the plain weight is dropped: only the packed copy is read from now on, and keeping
        # both would double the model's memory.
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x)
        return super().forward(x)

    def forward_act(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """activation(x @ W.T + b), `activation` a config.json `hidden_act` name."""
        if self.packed is not None and activation in FUSED_ACTIVATIONS:
            return self.packed.linear(x, activation)
        return get_activation(activation)(self(x))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x @ W.T + b + residual."""
        if self.packed is not None:
            return self.packed.linear_add(x, residual)
        return self(x) + residual


class PackedLinear(Linear):
    """`len(shard_sizes)` linears of the same input, computed as one; `split` cuts the output back."""

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = tuple(shard_sizes)
        set_packed_weight_loader(self, self.shard_sizes)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.shard_sizes, dim=-1)


class QKVLinear(PackedLinear):
    """q, k and v projections; k and v have `num_kv_heads` heads (fewer than q under GQA)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        kv = num_kv_heads * head_dim
        super().__init__(hidden, [num_heads * head_dim, kv, kv], bias)
        self.head_dim = head_dim

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim]."""
        q, k, v = self.split(self(x))
        return tuple(t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))  # type: ignore[return-value]
