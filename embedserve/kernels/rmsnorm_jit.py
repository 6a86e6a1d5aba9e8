"""The Triton body of `rmsnorm_triton` / `fused_add_rmsnorm_triton`; imported only at launch (it imports triton).

One program per row; the whole row fits one block (BLOCK = next power of two >= hidden size).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(
    X, Residual, Weight, Out, ResidualOut, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(X + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        # NOTE: normalise the sum as rounded to the stored dtype, so fused == unfused exactly.
        summed = (x + r).to(ResidualOut.dtype.element_ty)
        tl.store(ResidualOut + row * hidden + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
    w = tl.load(Weight + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * hidden + offs, (x * rstd * w).to(Out.dtype.element_ty), mask=mask)
