"""Triton kernels for the CUDA path, each beside a plain-torch reference of the same signature.

Every op has three names: `<op>_torch`, the reference (any device, the definition of right);
`<op>_triton`, one Triton launch (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 for tests);
and `<op>`, which takes the Triton path for CUDA tensors when triton is installed, the reference
otherwise.

    extend_attention   new tokens attend to their cached prefix (KV pool, page size 1) and to themselves
    rmsnorm            x / rms(x) * weight
    fused_add_rmsnorm  (rmsnorm(x + residual), x + residual) in one pass
    apply_rotary_      neox / GPT-J rotary embedding on q and k, in place
    pool_normalize     cls / last / mean pooling, `dimensions` cut and L2 norm, per packed sequence

NOTE: importing this package never imports triton (the CPU install has none); the `*_jit.py`
modules that hold the `@triton.jit` bodies load on the first launch.
"""

from embedserve.kernels.extend_attention import extend_attention_torch, extend_attention_triton
from embedserve.kernels.pool_normalize import pool_normalize_torch, pool_normalize_triton
from embedserve.kernels.rmsnorm import (
    fused_add_rmsnorm_torch,
    fused_add_rmsnorm_triton,
    rmsnorm_torch,
    rmsnorm_triton,
)
from embedserve.kernels.rotary import apply_rotary_torch_, apply_rotary_triton_, rotary_cos_sin_cache
from embedserve.kernels.runtime import dispatch

extend_attention = dispatch("extend_attention", extend_attention_torch, extend_attention_triton)
rmsnorm = dispatch("rmsnorm", rmsnorm_torch, rmsnorm_triton)
fused_add_rmsnorm = dispatch("fused_add_rmsnorm", fused_add_rmsnorm_torch, fused_add_rmsnorm_triton)
apply_rotary_ = dispatch("apply_rotary_", apply_rotary_torch_, apply_rotary_triton_)
pool_normalize = dispatch("pool_normalize", pool_normalize_torch, pool_normalize_triton)

__all__ = [
    "apply_rotary_",
    "apply_rotary_torch_",
    "apply_rotary_triton_",
    "extend_attention",
    "extend_attention_torch",
    "extend_attention_triton",
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_torch",
    "fused_add_rmsnorm_triton",
    "pool_normalize",
    "pool_normalize_torch",
    "pool_normalize_triton",
    "rmsnorm",
    "rmsnorm_torch",
    "rmsnorm_triton",
    "rotary_cos_sin_cache",
]
