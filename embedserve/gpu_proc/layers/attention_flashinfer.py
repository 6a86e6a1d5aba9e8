"""Attention through FlashInfer's batch prefill kernels, planned once per batch and run by every layer.

    fresh batch:  BatchPrefillWithRaggedKVCacheWrapper   q, k, v packed; qo_indptr = kv_indptr = cu_seqlens
    KV batch:     BatchPrefillWithPagedKVCacheWrapper    page size 1, pool [P, Hkv, D] viewed as [P, 1, Hkv, D]

In a KV batch, `Attention.forward` has already written the new tokens' K/V into the pool, so sequence
b's keys are its prefix slots followed by its new slots:

    kv_indices:  | b0 prefix slots | b0 new slots | b1 prefix slots | b1 new slots | ...
    kv_indptr:   0                                 p0 + n0                             p0 + n0 + p1 + n1

and causal=True is right as it stands: FlashInfer aligns the causal mask to the end of the kv sequence
(query i of n sees keys 0 .. kv_len - n + i), which puts new token i after the p prefix tokens.

NOTE: planning needs head counts, head_dim, scale and dtype before any layer runs: `configure`, which
ModelRunner calls once with the model's attention layers, records them (every layer must agree) and runs
both wrappers once on a 2-token batch, so that a kernel FlashInfer cannot build fails at start-up
(where `auto` falls back to triton) instead of failing every batch. flashinfer is imported lazily: the
CPU install has none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedserve.gpu_proc.layers.attention import (
    Attention,
    AttentionBackend,
    AttentionBackendUnavailable,
    ForwardContext,
)

logger = logging.getLogger(__name__)
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended split-k workspace
# NOTE: the head sizes FlashInfer's FA2/FA3 prefill kernels are built and tested for (and that
# flashinfer-jit-cache ships); other sizes go to triton rather than compiling an untested variant.
HEAD_DIMS = (64, 128, 256)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_HALF_ONLY = "FlashInfer's prefill kernels take float16 or bfloat16, not {}"


@dataclass(frozen=True)
class _Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype


def _flashinfer() -> Any:
    import flashinfer

    return flashinfer


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    @classmethod
    def unavailable(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        if device.type != "cuda":
            return f"FlashInfer needs a CUDA device, this runner is on {device}"
        if dtype is not None and dtype not in HALF_DTYPES:
            return _HALF_ONLY.format(dtype)
        try:
            _flashinfer()
        except Exception as exc:  # NOTE: a broken install can raise more than ImportError
            return f"flashinfer does not import ({type(exc).__name__}: {exc}); pip install flashinfer-python"
        return None

    def __init__(self, device: torch.device | str = "cuda"):
        super().__init__(device)
        fi = _flashinfer()
        # NOTE: allocated once per instance and shared by both wrappers: a batch uses only one of them,
        # and each is planned again before its next run.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.ragged = fi.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        self.paged = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.shape: _Shape | None = None

    def configure(self, layers: Sequence[Attention], dtype: torch.dtype) -> None:
        shapes = {(a.num_heads, a.num_kv_heads, a.head_dim, a.scale) for a in layers}
        if len(shapes) != 1:
            raise AttentionBackendUnavailable(f"one plan serves every layer, but the layers differ: {shapes}")
        heads, kv_heads, head_dim, scale = shapes.pop()
        if head_dim not in HEAD_DIMS:
            raise AttentionBackendUnavailable(f"head_dim {head_dim} is not one of FlashInfer's {HEAD_DIMS}")
        if dtype not in HALF_DTYPES:
            raise AttentionBackendUnavailable(_HALF_ONLY.format(dtype))
        self.shape = _Shape(heads, kv_heads, head_dim, scale, dtype)
        # NOTE: without flashinfer-jit-cache the first run compiles the kernels with nvcc: on an H200
        # (FlashInfer 0.6.1, CUDA 13) that took over two minutes, silent unless said here.
        started = time.monotonic()
        logger.info(
            "FlashInfer: building its prefill kernels (the first start without flashinfer-jit-cache "
            "compiles them with nvcc, which can take minutes)"
        )
        try:
            self._warm_up()
        except Exception as exc:
            raise AttentionBackendUnavailable(
                f"FlashInfer failed on a 2-token batch ({type(exc).__name__}: {exc}); it compiles its kernels "
                "at first use, which needs nvcc (CUDA_HOME) or the flashinfer-jit-cache package"
            ) from exc
        logger.info("FlashInfer: kernels ready in %.1f s", time.monotonic() - started)

    def plan(self, ctx: ForwardContext) -> Any:
        """Plans the batch's wrapper from host arrays (no device sync); every layer then runs it."""
        new_lens = np.asarray(ctx.seq_lens, dtype=np.int64)
        if ctx.kv is None:
            self._plan_ragged(new_lens, ctx.causal)
            return self.ragged
        host = ctx.kv.host
        prefix_lens = np.asarray(host.prefix_lens, dtype=np.int64)
        indices = kv_indices(prefix_lens, host.prefix_slots, new_lens, host.new_slots)
        self._plan_paged(new_lens, prefix_lens + new_lens, indices, ctx.causal)
        return self.paged

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        # NOTE: strided q/k/v (column slices of the fused qkv projection) are fine: the kernels take
        # token and head strides; only the last dim must be contiguous.
        return ctx.plan.run(q, k, v)

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        assert layer.k_cache is not None and layer.v_cache is not None
        # [P, Hkv, D] -> [P, 1, Hkv, D]: pages of one token, NHD, as a view
        return ctx.plan.run(q, (layer.k_cache.unsqueeze(1), layer.v_cache.unsqueeze(1)))

    def _plan_ragged(self, lens: np.ndarray, causal: bool) -> None:
        s = self._configured()
        cu = _indptr(lens)
        self.ragged.plan(
            cu, cu, s.num_heads, s.num_kv_heads, s.head_dim,
            causal=causal, sm_scale=s.scale, q_data_type=s.dtype, kv_data_type=s.dtype,
        )  # fmt: skip

    def _plan_paged(
        self, new_lens: np.ndarray, kv_lens: np.ndarray, indices: np.ndarray, causal: bool
    ) -> None:
        s = self._configured()
        last_page_len = torch.ones(len(new_lens), dtype=torch.int32)  # page size 1: every page is full
        self.paged.plan(
            _indptr(new_lens), _indptr(kv_lens), torch.from_numpy(indices), last_page_len,
            s.num_heads, s.num_kv_heads, s.head_dim, 1,
            causal=causal, sm_scale=s.scale, q_data_type=s.dtype, kv_data_type=s.dtype,
        )  # fmt: skip

    def _configured(self) -> _Shape:
        if self.shape is None:
            raise RuntimeError("FlashInferAttention.configure() must run before the first batch")
        return self.shape

    def _warm_up(self) -> None:
        """Both wrappers on one sequence of 2 new tokens (the paged one over 1 cached token)."""
        s = self._configured()

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, dtype=s.dtype, device=self.device)

        q = rand(2, s.num_heads, s.head_dim)
        k, v = rand(2, s.num_kv_heads, s.head_dim), rand(2, s.num_kv_heads, s.head_dim)
        self._plan_ragged(np.array([2]), causal=True)
        fresh = self.ragged.run(q, k, v)
        pool = rand(3, 1, s.num_kv_heads, s.head_dim), rand(3, 1, s.num_kv_heads, s.head_dim)
        self._plan_paged(np.array([2]), np.array([3]), np.array([2, 0, 1], dtype=np.int32), causal=True)
        extended = self.paged.run(q, pool)
        if not (fresh.isfinite().all() and extended.isfinite().all()):
            raise RuntimeError("non-finite attention output on random inputs")


def kv_indices(
    prefix_lens: np.ndarray, prefix_slots: np.ndarray, new_lens: np.ndarray, new_slots: np.ndarray
) -> np.ndarray:
    """int32: each sequence's prefix slots, then its new slots, sequences concatenated (page size 1)."""
    total = prefix_lens + new_lens
    offset = np.arange(int(total.sum())) - np.repeat(np.cumsum(total) - total, total)  # within its sequence
    is_prefix = offset < np.repeat(prefix_lens, total)
    out = np.empty(len(offset), dtype=np.int32)
    # NOTE: a boolean mask fills in order, so sequence 0's slots land before sequence 1's.
    out[is_prefix] = prefix_slots
    out[~is_prefix] = new_slots
    return out


def _indptr(lens: np.ndarray) -> torch.Tensor:
    """int32 [B + 1] on the host: FlashInfer's plan reads its indptrs on the CPU anyway."""
    out = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=out[1:])
    return torch.from_numpy(out)
