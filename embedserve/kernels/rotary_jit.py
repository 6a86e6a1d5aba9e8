"""The Triton body of `apply_rotary_triton_`; imported only at launch (it imports triton).

One program per token: it reads the token's cos/sin row once and rotates all q heads, then all k heads.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X, stride_h, num_heads, half, cos, sin, offs_r, mask_r,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Rotates lanes (i, i + half) [neox] or (2i, 2i + 1) [interleaved] of every head at X, in place."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < num_heads)[:, None] & mask_r[None, :]
    if IS_NEOX:
        lane1, lane2 = offs_r, offs_r + half
    else:
        lane1, lane2 = 2 * offs_r, 2 * offs_r + 1
    ptr1 = X + offs_h[:, None] * stride_h + lane1[None, :]
    ptr2 = X + offs_h[:, None] * stride_h + lane2[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr2, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(
    Q, K, Positions, CosSin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads, half,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < half
    cos = tl.load(CosSin + pos * stride_cache + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CosSin + pos * stride_cache + half + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        Q + token * stride_qt, stride_qh, num_q_heads, half, cos, sin, offs_r, mask_r, IS_NEOX, BLOCK_H
    )
    _rotate_heads(
        K + token * stride_kt, stride_kh, num_k_heads, half, cos, sin, offs_r, mask_r, IS_NEOX, BLOCK_H
    )
