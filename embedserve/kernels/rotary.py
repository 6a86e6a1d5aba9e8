"""Rotary position embedding applied to q and k in place, for packed tokens at arbitrary positions.

The cache holds one row per position, `[cos(pos * f_0..f_{r/2-1}) | sin(...)]` with r = rotary_dim
(vLLM's layout). Only the first r lanes of each head rotate (partial rotary); the rest pass through.
Pairs that rotate together:

    is_neox=True  (HF Llama/Qwen `rotate_half`):  lane i with lane i + r/2
    is_neox=False (GPT-J, interleaved):           lane 2i with lane 2i + 1

Math in float32, results cast back to q/k's dtype.
"""

from __future__ import annotations

import torch

from embedserve.kernels.runtime import check_launchable, pow2_at_least

CosSin = torch.Tensor | tuple[float, int]  # a cache, or (base, rotary_dim) to build one on the fly


def rotary_cos_sin_cache(
    max_positions: int, rotary_dim: int, base: float = 10000.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 [max_positions, rotary_dim]: row p is [cos(p * inv_freq) | sin(p * inv_freq)]."""
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_torch_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: CosSin, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, Hkv, D] in place by their token's position; returns (q, k)."""
    cache = _as_cache(cos_sin_cache, positions, q)
    cos, sin = cache[positions.long()].float().chunk(2, dim=-1)  # [T, r/2] each
    for x in (q, k):
        _rotate_(x, cos[:, None, :], sin[:, None, :], is_neox)
    return q, k


def apply_rotary_triton_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: CosSin, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_torch_` as one Triton program per token, covering all its q and k heads."""
    check_launchable(q)
    from embedserve.kernels.rotary_jit import rotary_kernel

    cache = _as_cache(cos_sin_cache, positions, q).contiguous()
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a unit stride on the last dim: the rotation is written in place")
    if q.shape[0] == 0:
        return q, k
    half = cache.shape[-1] // 2
    rotary_kernel[(q.shape[0],)](
        q, k, positions, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cache.stride(0),
        q.shape[1], k.shape[1], half,
        IS_NEOX=is_neox, BLOCK_H=pow2_at_least(max(q.shape[1], k.shape[1])), BLOCK_R=pow2_at_least(half),
    )  # fmt: skip
    return q, k


def _as_cache(cos_sin_cache: CosSin, positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The cache itself, or one built from (base, rotary_dim) up to the largest position.

    NOTE: building costs a host sync and a few small kernels per call; model code should build the
    cache once with `rotary_cos_sin_cache` and pass it.
    """
    if isinstance(cos_sin_cache, torch.Tensor):
        cache = cos_sin_cache
    else:
        base, rotary_dim = cos_sin_cache
        max_pos = int(positions.max()) + 1 if positions.numel() else 1
        cache = rotary_cos_sin_cache(max_pos, rotary_dim, base, device=q.device)
    if cache.shape[-1] > q.shape[-1]:
        raise ValueError(f"rotary_dim {cache.shape[-1]} exceeds head_dim {q.shape[-1]}")
    return cache


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    half = cos.shape[-1]
    rot = x[..., : 2 * half]
    x1, x2 = (rot[..., :half], rot[..., half:]) if is_neox else (rot[..., 0::2], rot[..., 1::2])
    # NOTE: both outputs are computed before either write: x1 and x2 are views into x.
    x1f, x2f = x1.float(), x2.float()
    out1, out2 = x1f * cos - x2f * sin, x2f * cos + x1f * sin
    x1.copy_(out1)
    x2.copy_(out2)
