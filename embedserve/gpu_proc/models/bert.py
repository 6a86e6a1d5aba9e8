"""BERT encoders (MiniLM, bge, e5, gte-base) and XLM-RoBERTa (bge-m3, multilingual-e5) over packed,
unpadded batches.

NOTE: module names mirror the Hugging Face checkpoint (`encoder.layer.N.attention.self...`) so weights
load by name; the only renaming is the fused `qkv_proj`, declared in `packed_modules_mapping`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from embedserve.gpu_proc.layers.activation import get_activation
from embedserve.gpu_proc.layers.attention import Attention
from embedserve.gpu_proc.layers.linear import Linear, PackedLinear


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any], position_offset: int = 0):
        super().__init__()
        self.position_offset = position_offset
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(cfg.get("max_position_embeddings", 512), hidden)
        self.token_type_embeddings = nn.Embedding(cfg.get("type_vocab_size", 2), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # NOTE: every token is segment 0: an embedding input is one text, never a sentence pair.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, self.num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = PackedLinear(hidden, [hidden] * 3, bias=True)
        self.attn = Attention(self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return self.attn(q, k, v).flatten(1)


class BertAddNorm(nn.Module):
    """dense, residual add, LayerNorm: the output step of both the attention and the MLP block."""

    def __init__(self, in_features: int, cfg: dict[str, Any]):
        super().__init__()
        self.dense = Linear(in_features, cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg.get("layer_norm_eps", 1e-12))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense.forward_add(x, residual))


class BertAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertAddNorm(cfg["hidden_size"], cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.dense = Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.act = cfg.get("hidden_act", "gelu")
        get_activation(self.act)  # NOTE: an unknown name fails here, at build, not in the first batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense.forward_act(x, self.act)


class BertLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAddNorm(cfg["intermediate_size"], cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertModel(nn.Module):
    """Last hidden states [tokens, hidden] of a packed batch; attention reads the forward context."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        "query": ("qkv_proj", 0),
        "key": ("qkv_proj", 1),
        "value": ("qkv_proj", 2),
    }

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported position_embedding_type {cfg['position_embedding_type']!r}")
        self.embeddings = BertEmbeddings(cfg, self.first_position(cfg))
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions))

    @staticmethod
    def first_position(cfg: dict[str, Any]) -> int:
        """The row of the position table that a sequence's first token reads."""
        return 0


class XLMRobertaModel(BertModel):
    """BERT's layout; positions start after the padding row, as fairseq numbered them.

    NOTE: HF derives positions from the ids (`create_position_ids_from_input_ids`): padding_idx + 1 + i
    for the i-th non-pad token. Our sequences hold no padding, so that is a constant offset.
    """

    @staticmethod
    def first_position(cfg: dict[str, Any]) -> int:
        pad = cfg.get("pad_token_id")
        return (1 if pad is None else int(pad)) + 1
