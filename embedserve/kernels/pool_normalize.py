"""One embedding per packed sequence: pool, keep the first `dimensions` components, L2-normalise.

Fused so the pooled [B, H] vectors never round-trip through memory between the three steps. The cut
comes before the normalisation (Matryoshka embeddings: a prefix of the vector is itself an embedding
once renormalised), so asking for `dimensions` always normalises.

    hidden:      | s0 s0 s0 | s1 s1 | ...      cu_seqlens: 0, 3, 5, ...
    cls  -> s0's first token, last -> s0's last token, mean -> average of s0's tokens (float32 sum)

NOTE: every sequence must hold at least one token; an empty one has no cls/last token and no mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from embedserve.kernels.runtime import block_size, check_launchable, pow2_at_least

NORM_EPS = 1e-12  # F.normalize's default: a zero vector stays zero instead of becoming NaN


def _cls(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return hidden[starts].float()


def _last(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return hidden[ends - 1].float()


def _mean(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    lens = ends - starts
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
    sums = torch.zeros(len(lens), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_of_token, hidden.float())
    return sums / lens.unsqueeze(1).float()


_POOLS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": _cls,
    "last": _last,
    "mean": _mean,
}
_MODE_IDS = {"cls": 0, "last": 1, "mean": 2}  # the kernel's constexpr MODE


def pool_normalize_torch(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    normalize: bool = True,
    dimensions: int | None = None,
) -> torch.Tensor:
    """hidden [T, H], cu_seqlens [B+1] -> float32 [B, dimensions or H].

    mode is "cls", "last" or "mean"; the vectors are L2-normalised when `normalize` or `dimensions` is set.
    """
    dims = _check_args(hidden, mode, dimensions)
    pooled = _POOLS[mode](hidden, cu_seqlens[:-1].long(), cu_seqlens[1:].long())[:, :dims]
    return F.normalize(pooled, p=2, dim=-1, eps=NORM_EPS) if normalize or dimensions else pooled


def pool_normalize_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    normalize: bool = True,
    dimensions: int | None = None,
) -> torch.Tensor:
    """`pool_normalize_torch` as one Triton program per sequence."""
    check_launchable(hidden)
    from embedserve.kernels.pool_normalize_jit import pool_normalize_kernel

    dims = _check_args(hidden, mode, dimensions)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    num_seqs = cu_seqlens.shape[0] - 1
    out = torch.empty(num_seqs, dims, dtype=torch.float32, device=hidden.device)
    if num_seqs == 0:
        return out
    block_h = pow2_at_least(dims)
    # NOTE: a [BLOCK_T, BLOCK_H] tile of ~8k lanes per step of the mean keeps registers in check at H=4096.
    block_t = block_size(max(8192 // block_h, 1), 4)
    pool_normalize_kernel[(num_seqs,)](
        hidden, cu_seqlens, out, hidden.stride(0), dims, NORM_EPS,
        MODE=_MODE_IDS[mode], NORMALIZE=bool(normalize or dimensions), BLOCK_T=block_t, BLOCK_H=block_h,
        num_warps=min(max(block_h // 256, 1), 8),
    )  # fmt: skip
    return out


def _check_args(hidden: torch.Tensor, mode: str, dimensions: int | None) -> int:
    """Validates; returns how many components each output vector keeps."""
    if mode not in _POOLS:
        raise ValueError(f"unknown pooling {mode!r}; choose one of {sorted(_POOLS)}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden], got {tuple(hidden.shape)}")
    if dimensions is not None and not 1 <= dimensions <= hidden.shape[1]:
        raise ValueError(f"dimensions must be in [1, {hidden.shape[1]}], got {dimensions}")
    return dimensions or hidden.shape[1]
