"""Building blocks shared by every model family: attention behind one interface, norms, rotary,
fused linears, activations, pooling."""

from embedserve.gpu_proc.layers.activation import ACTIVATIONS, GatedActivation, get_activation
from embedserve.gpu_proc.layers.attention import (
    ATTENTION_BACKENDS,
    Attention,
    AttentionBackend,
    ForwardContext,
    KvBatch,
    KvContext,
    TorchAttention,
    forward_context,
    get_attention_backend,
    get_forward_context,
    make_forward_context,
)
from embedserve.gpu_proc.layers.linear import PackedLinear, QKVLinear
from embedserve.gpu_proc.layers.mlp import GatedMLP
from embedserve.gpu_proc.layers.norm import RMSNorm
from embedserve.gpu_proc.layers.pooling import Pooler
from embedserve.gpu_proc.layers.rotary import RotaryEmbedding

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_BACKENDS",
    "Attention",
    "AttentionBackend",
    "ForwardContext",
    "GatedActivation",
    "GatedMLP",
    "KvBatch",
    "KvContext",
    "PackedLinear",
    "Pooler",
    "QKVLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "TorchAttention",
    "forward_context",
    "get_activation",
    "get_attention_backend",
    "get_forward_context",
    "make_forward_context",
]
