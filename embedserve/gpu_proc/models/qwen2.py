"""Qwen2 (gte-Qwen2): Llama's decoder with biases on the q, k and v projections."""

from __future__ import annotations

from typing import Any

from embedserve.gpu_proc.models.llama import DecoderOptions, LlamaModel


class Qwen2Model(LlamaModel):
    @staticmethod
    def options(cfg: dict[str, Any]) -> DecoderOptions:
        # NOTE: Qwen2 always biases q/k/v, never o_proj or the MLP; its config has no switch for it.
        return DecoderOptions(qkv_bias=True)
