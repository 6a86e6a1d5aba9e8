"""Attention through embedserve's own CPU kernel (`kernels/cpu_attention.c`): the whole packed batch in
one call per layer, its (sequence, head) pairs shared between the cores.

NOTE: measured on 2 Zen 4 cores, one MiniLM layer over 40 mixed sequences (3,442 tokens): 11-18 ms
against 14-19 ms for the torch backend's per-sequence SDPA loop (best of 7, the spread is the
machine's noise); single-threaded on 250-token sequences it computes ~50 GFLOP/s, about half of what
torch's GEMMs reach per core. Batches that extend cached prefixes (causal models through the KV pool)
keep the torch reference path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embedserve.gpu_proc.layers.attention import (
    Attention,
    AttentionBackendUnavailable,
    ForwardContext,
    TorchAttention,
)
from embedserve.kernels.cpu_attention import LANES, cpu_attention, cpu_attention_unavailable


class CpuAttention(TorchAttention):
    name = "cpu"

    @classmethod
    def unavailable(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        if device.type != "cpu":
            return f"the CPU attention kernel runs on the CPU, not {device.type}"
        return cpu_attention_unavailable(dtype)

    def configure(self, layers: Sequence[Attention], dtype: torch.dtype) -> None:
        odd = sorted({layer.head_dim for layer in layers if layer.head_dim % LANES})
        if odd:
            raise AttentionBackendUnavailable(
                f"head_dim {odd} is not a multiple of the kernel's {LANES} lanes"
            )

    def plan(self, ctx: ForwardContext) -> np.ndarray:
        return ctx.cu_seqlens.numpy().astype(np.int64)  # a CPU tensor: no copy to fetch it

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        return cpu_attention(q, k, v, ctx.plan, layer.scale, ctx.causal)
