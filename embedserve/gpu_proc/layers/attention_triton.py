"""Attention through the Triton extend-attention kernel: one launch per layer for the whole batch.

A fresh batch is run as an extension of empty prefixes (every prefix length 0, a [B, 0] page table),
so one kernel serves both paths; grouped-query heads are read in place, never repeated:

    fresh batch:  prefix_lens = 0 ... 0, page_table [B, 0]   -> tokens attend to their own sequence
    KV batch:     ctx.kv.prefix_lens, ctx.kv.page_table       -> cached prefix, then the new tokens

NOTE: `extend_attention_triton` is called directly, not the `extend_attention` dispatcher, which sends
CPU tensors to the torch reference: under TRITON_INTERPRET=1 this backend then really runs the kernel
on CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch

from embedserve.gpu_proc.layers.attention import Attention, AttentionBackend, ForwardContext
from embedserve.kernels import extend_attention_triton
from embedserve.kernels.runtime import interpreting, triton_installed


class TritonAttention(AttentionBackend):
    name = "triton"

    @classmethod
    def unavailable(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        if not triton_installed():
            return "the triton package is not installed (pip install embedserve[gpu])"
        if device.type != "cuda" and not interpreting():
            return (
                f"Triton kernels need a CUDA device, this runner is on {device} "
                "(TRITON_INTERPRET=1 runs them on CPU tensors, slowly: for tests)"
            )
        return None

    def plan(self, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        if ctx.kv is not None:
            return None
        no_prefix = torch.zeros(ctx.num_seqs, dtype=torch.int32, device=ctx.cu_seqlens.device)
        return no_prefix, no_prefix.new_empty((ctx.num_seqs, 0))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        prefix_lens, page_table = ctx.plan
        # NOTE: k and v stand in for the pool: with every prefix length 0 the kernel never reads it.
        return extend_attention_triton(
            q, k, v, k, v, ctx.cu_seqlens, prefix_lens, page_table, causal=ctx.causal, sm_scale=layer.scale
        )

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        assert ctx.kv is not None and layer.k_cache is not None and layer.v_cache is not None
        return extend_attention_triton(
            q, k, v, layer.k_cache, layer.v_cache, ctx.cu_seqlens, ctx.kv.prefix_lens, ctx.kv.page_table,
            causal=ctx.causal, sm_scale=layer.scale,
        )  # fmt: skip
