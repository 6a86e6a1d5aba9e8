"""Llama-style decoders: Llama and Mistral (e5-mistral) here; Qwen2 and Qwen3 change a few options.

Each layer is pre-norm, its norms fused with the residual add before them:

    x -> RMSNorm -> q/k/v (rotary; fewer kv heads under GQA) -> causal attention -> o_proj -> + residual
      -> RMSNorm -> down(silu(gate) * up) -> + residual            ... then a final RMSNorm

NOTE: module names mirror HF checkpoints (`layers.N.self_attn.o_proj`, `layers.N.mlp.down_proj`,
`norm`) so weights load by name; q/k/v and gate/up are fused, as `packed_modules_mapping` declares.
The weight loader drops the `model.` prefix and the `lm_head` of `*ForCausalLM` checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from embedserve.gpu_proc.layers.attention import Attention
from embedserve.gpu_proc.layers.linear import Linear, QKVLinear
from embedserve.gpu_proc.layers.mlp import GatedMLP
from embedserve.gpu_proc.layers.norm import RMSNorm
from embedserve.gpu_proc.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class DecoderOptions:
    """Where a family's layer departs from Llama's; each family derives these from its config."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k, before the rotary


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def sliding_window(cfg: dict[str, Any]) -> int | None:
    """The window some layers attend within (Mistral), or None where every layer sees all tokens."""
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") is False or (layer_types and "sliding_attention" not in layer_types):
        return None
    return cfg.get("sliding_window")


class DecoderAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], opts: DecoderOptions, rotary: RotaryEmbedding):
        super().__init__()
        hidden, heads, dim = cfg["hidden_size"], cfg["num_attention_heads"], head_dim(cfg)
        kv_heads = cfg.get("num_key_value_heads") or heads
        self.qkv_proj = QKVLinear(hidden, dim, heads, kv_heads, bias=opts.qkv_bias)
        self.o_proj = Linear(heads * dim, hidden, bias=opts.o_bias)
        self.qk_norm = opts.qk_norm
        if opts.qk_norm:
            self.q_norm = RMSNorm(dim, cfg.get("rms_norm_eps", 1e-6))
            self.k_norm = RMSNorm(dim, cfg.get("rms_norm_eps", 1e-6))
        self.rotary_emb = rotary
        self.attn = Attention(heads, dim, kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.forward_heads(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], opts: DecoderOptions, rotary: RotaryEmbedding):
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = DecoderAttention(cfg, opts, rotary)
        self.mlp = GatedMLP(hidden, cfg["intermediate_size"], cfg.get("hidden_act", "silu"), opts.mlp_bias)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(positions, x), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Last hidden states [tokens, hidden] of a packed batch; attention reads the forward context."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        opts = self.options(cfg)
        # NOTE: one rotary module (and so one cos/sin table) shared by every layer.
        rotary = RotaryEmbedding.from_config(cfg, head_dim(cfg))
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg, opts, rotary) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.sliding_window = sliding_window(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]

    @staticmethod
    def options(cfg: dict[str, Any]) -> DecoderOptions:
        bias = bool(cfg.get("attention_bias"))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias")))
