"""RMSNorm, alone and fused with the residual add that precedes it in every Llama/Qwen layer.

Semantics (Qwen/Llama): statistics and scaling in float32, the result cast back to the input dtype;
`weight` multiplies the normalised value (no Gemma-style `1 + weight`). The fused form first rounds
`x + residual` to the input dtype, because that rounded sum is the residual stream the next layer
adds to, and normalises that same rounded value: fused == `rmsnorm(x + residual)`, bit for bit.
"""

from __future__ import annotations

import torch

from embedserve.kernels.runtime import check_launchable, pow2_at_least


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., H], weight [H] -> x / sqrt(mean(x**2) + eps) * weight, in x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def fused_add_rmsnorm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual) * weight, x + residual), both in x's dtype."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_torch(new_residual, weight, eps), new_residual


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`rmsnorm_torch` as one Triton program per row."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rmsnorm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rmsnorm_torch` in one pass over memory: read x and residual once, write both results."""
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_launchable(x)
    from embedserve.kernels.rmsnorm_jit import rmsnorm_kernel

    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    rows = x.reshape(-1, hidden).contiguous()
    res_rows = residual.reshape(-1, hidden).contiguous() if residual is not None else None
    out = torch.empty_like(rows)
    new_res = torch.empty_like(rows) if residual is not None else None
    if rows.shape[0] > 0:
        block = pow2_at_least(hidden)
        # NOTE: with residual=None the residual pointers are never read (HAS_RESIDUAL is constexpr).
        rmsnorm_kernel[(rows.shape[0],)](
            rows, res_rows if res_rows is not None else rows, weight.contiguous(), out,
            new_res if new_res is not None else out, hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 8),
        )  # fmt: skip
    return out.view(x.shape), new_res.view(x.shape) if new_res is not None else None
