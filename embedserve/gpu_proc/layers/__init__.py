"""Building blocks shared by every model family: attention behind one interface, pooling."""

from embedserve.gpu_proc.layers.attention import (
    ATTENTION_BACKENDS,
    Attention,
    AttentionBackend,
    ForwardContext,
    TorchAttention,
    forward_context,
    get_attention_backend,
    get_forward_context,
    make_forward_context,
)
from embedserve.gpu_proc.layers.pooling import Pooler

__all__ = [
    "ATTENTION_BACKENDS",
    "Attention",
    "AttentionBackend",
    "ForwardContext",
    "Pooler",
    "TorchAttention",
    "forward_context",
    "get_attention_backend",
    "get_forward_context",
    "make_forward_context",
]
