"""Extend attention: the new tokens of packed sequences attend to their cached prefix and to themselves.

One call covers a whole batch of variable-length sequences. Sequence b owns new tokens
`cu_seqlens_new[b]:cu_seqlens_new[b+1]` of the packed q/k/v, and `prefix_lens[b]` cached tokens whose
K/V live in the pool at rows `prefix_page_table[b, :prefix_lens[b]]` (page size 1):

    keys seen by sequence b:  | k_pool[page_table[b, 0]] ... k_pool[page_table[b, p-1]] | k_extend[s] ... k_extend[e-1] |
                                 prefix (always visible)                                   new tokens (token i sees 0..i if causal)

Query head h reads kv head h // (num_heads // num_kv_heads) (grouped-query attention).
"""

from __future__ import annotations

import math

import torch

from embedserve.kernels.runtime import block_size, cdiv, check_launchable, pow2_at_least


def extend_attention_torch(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    prefix_lens: torch.Tensor,
    prefix_page_table: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of the new tokens over prefix + new keys; [T_new, H, D] in q's dtype.

    q_extend [T_new, H, D]; k_extend, v_extend [T_new, Hkv, D]; k_pool, v_pool [P, Hkv, D];
    cu_seqlens_new [B+1] int32; prefix_lens [B] int32; prefix_page_table [B, max_prefix] int32 (pool
    row of each prefix token). sm_scale defaults to D**-0.5. Scores and softmax are float32.
    """
    group = _check_args(q_extend, k_extend, v_extend, k_pool, v_pool, cu_seqlens_new, prefix_lens)
    scale = sm_scale if sm_scale is not None else q_extend.shape[-1] ** -0.5
    out = torch.empty(q_extend.shape, dtype=q_extend.dtype, device=q_extend.device)
    bounds = cu_seqlens_new.tolist()
    for b, prefix_len in enumerate(prefix_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        if end == start:
            continue
        rows = prefix_page_table[b, :prefix_len].long()
        k = torch.cat([k_pool[rows], k_extend[start:end]]).float()  # [prefix + new, Hkv, D]
        v = torch.cat([v_pool[rows], v_extend[start:end]]).float()
        q = q_extend[start:end].float().unflatten(1, (k.shape[1], group))  # [new, Hkv, group, D]
        scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
        if causal:
            # NOTE: new token i sits at key position prefix_len + i, and sees every key up to it.
            new_pos = prefix_len + torch.arange(end - start, device=q.device)
            key_pos = torch.arange(k.shape[0], device=q.device)
            scores.masked_fill_(key_pos[None, :] > new_pos[:, None], float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", scores.softmax(dim=-1), v)
        out[start:end] = o.flatten(1, 2).to(out.dtype)
    return out


def extend_attention_triton(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    prefix_lens: torch.Tensor,
    prefix_page_table: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """The same computation as `extend_attention_torch`, in one Triton launch (online softmax, fp32 accumulators)."""
    check_launchable(q_extend, k_pool)
    group = _check_args(q_extend, k_extend, v_extend, k_pool, v_pool, cu_seqlens_new, prefix_lens)
    from embedserve.kernels.extend_attention_jit import extend_attention_kernel

    q, k, v, kp, vp = (_unit_last_stride(t) for t in (q_extend, k_extend, v_extend, k_pool, v_pool))
    page_table = _unit_last_stride(prefix_page_table)
    # NOTE: an empty pool or page table (no prefix anywhere) may carry a null data pointer, which the
    # CUDA launcher rejects. With every prefix_len 0 the kernel never reads them: any tensor will do.
    if kp.numel() == 0:
        kp, vp = k, v
    if page_table.numel() == 0:
        page_table = prefix_lens.reshape(-1, 1)
    num_seqs, num_heads, head_dim = prefix_lens.shape[0], q.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    # NOTE: one host sync, to size the grid's third axis by the longest new sequence.
    max_new = int((cu_seqlens_new[1:] - cu_seqlens_new[:-1]).max())
    block_m, block_n = block_size(64, 16), block_size(64 if head_dim <= 128 else 32, 16)
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    grid = (num_seqs, num_heads, cdiv(max_new, block_m))
    extend_attention_kernel[grid](
        q, k, v, kp, vp, out, cu_seqlens_new, prefix_lens, page_table,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0), head_dim,
        GROUP=group, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        # NOTE: tl.dot needs K >= 16 on GPUs; the padded lanes are masked to zero.
        BLOCK_D=pow2_at_least(head_dim, 16),
        # NOTE: fp32 inputs would otherwise round to tf32 on GPUs; fp16/bf16 ignore this.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if head_dim <= 64 else 8,
        # NOTE: two stages keep K/V tiles of head_dim 128-256 within the shared memory of smaller GPUs.
        num_stages=2,
    )  # fmt: skip
    return out


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels step rows by stride and lanes by 1: views with a strided last dim are copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_args(q, k, v, k_pool, v_pool, cu_seqlens_new, prefix_lens) -> int:
    """Validates shapes; returns how many query heads share one kv head."""
    if q.dim() != 3 or k.shape != v.shape or k_pool.shape != v_pool.shape:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads or k_pool.shape[1:] != k.shape[1:] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} / pool {tuple(k_pool.shape)}")
    if cu_seqlens_new.shape[0] != prefix_lens.shape[0] + 1:
        raise ValueError("cu_seqlens_new must have one more entry than prefix_lens")
    return num_heads // num_kv_heads
