"""The Triton body of `extend_attention_triton`; imported only when a launch needs it (it imports triton).

One program owns BLOCK_M new tokens of one sequence for one query head. It sweeps the sequence's
prefix keys (gathered from the pool through the page table), then its new keys, keeping a running
max `m`, a running softmax denominator `l` and an unnormalised output `acc`, all float32:

    grid = (num_seqs, num_heads, cdiv(max_new_tokens, BLOCK_M))
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """Folds one block of keys (k: [D, N], v: [N, D]) into the running (m, l, acc) of q's rows."""
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_kv_block(k_base, v_base, rows, stride_k, stride_v, mask_n, offs_d, mask_d):
    """One block of keys, transposed ([D, N]), and of values ([N, D]), at token `rows` of the bases."""
    k_mask, v_mask = mask_n[None, :] & mask_d[:, None], mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_base + rows[None, :] * stride_k + offs_d[:, None], mask=k_mask, other=0.0)
    v = tl.load(v_base + rows[:, None] * stride_v + offs_d[None, :], mask=v_mask, other=0.0)
    return k, v


@triton.jit
def extend_attention_kernel(
    Q, K, V, KPool, VPool, Out, CuSeqlens, PrefixLens, PageTable,
    scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kpt, stride_kph, stride_vpt, stride_vph, stride_ot, stride_oh,
    stride_page_b, head_dim,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    seq, head, m_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUP
    seq_start = tl.load(CuSeqlens + seq).to(tl.int64)
    seq_len = (tl.load(CuSeqlens + seq + 1) - seq_start).to(tl.int32)
    if m_block * BLOCK_M >= seq_len:
        return  # the grid is sized for the longest sequence
    prefix_len = tl.load(PrefixLens + seq)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < seq_len, offs_d < head_dim
    q_ptrs = Q + (seq_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # NOTE: the running max starts finite, not -inf: a block whose keys are all masked then gives
    # exp2(-inf - (-1e30)) = 0 and a rescale of exp2(0) = 1, instead of exp2(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Per-(sequence, kv head) bases: inside the loops only the token offset varies.
    k_pool_head, v_pool_head = KPool + kv_head * stride_kph, VPool + kv_head * stride_vph
    k_new = K + seq_start * stride_kt + kv_head * stride_kh
    v_new = V + seq_start * stride_vt + kv_head * stride_vh

    # Prefix keys: every new token sees all of them.
    for start_n in range(0, prefix_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix_len
        # NOTE: int64 row offsets: pool rows * row stride can pass 2**31 on a large pool.
        rows = tl.load(PageTable + seq * stride_page_b + offs_n, mask=mask_n, other=0).to(tl.int64)
        k, v = _load_kv_block(k_pool_head, v_pool_head, rows, stride_kpt, stride_vpt, mask_n, offs_d, mask_d)
        valid = mask_n[None, :]
        m_i, l_i, acc = _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale_log2, DOT_PRECISION)

    # New keys: causal rows stop at their own position, so later key blocks are skipped outright.
    end_n = tl.minimum(seq_len, (m_block + 1) * BLOCK_M) if CAUSAL else seq_len
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        k, v = _load_kv_block(k_new, v_new, offs_n, stride_kt, stride_vt, mask_n, offs_d, mask_d)
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale_log2, DOT_PRECISION)

    # NOTE: padded rows (offs_m >= seq_len) may have l == 0; they are never stored, the guard keeps them finite.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + (seq_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
