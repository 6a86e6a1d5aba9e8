"""The Triton body of `pool_normalize_triton`; imported only at launch (it imports triton).

One program per sequence: it reads only the first `dims` lanes of the rows it pools, sums in float32,
then scales the vector to unit length. MODE: 0 = cls, 1 = last, 2 = mean.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pool_normalize_kernel(
    Hidden, CuSeqlens, Out, stride_ht, dims, eps,
    MODE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    end = tl.load(CuSeqlens + seq + 1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < dims
    if MODE == 0:
        pooled = tl.load(Hidden + start * stride_ht + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    elif MODE == 1:
        pooled = tl.load(Hidden + (end - 1) * stride_ht + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    else:
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < end)[:, None] & mask_h[None, :]
            tile = tl.load(Hidden + offs_t[:, None] * stride_ht + offs_h[None, :], mask=mask, other=0.0)
            total += tl.sum(tile.to(tl.float32), axis=0)
        pooled = total / (end - start).to(tl.float32)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(pooled * pooled, axis=0))
        pooled = pooled / tl.maximum(norm, eps)
    tl.store(Out + seq * dims + offs_h, pooled, mask=mask_h)
