"""Qwen3 (Qwen3-Embedding): Llama's decoder with an RMSNorm over each head of q and k."""

from __future__ import annotations

from typing import Any

from embedserve.gpu_proc.models.llama import DecoderOptions, LlamaModel


class Qwen3Model(LlamaModel):
    @staticmethod
    def options(cfg: dict[str, Any]) -> DecoderOptions:
        bias = bool(cfg.get("attention_bias"))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
