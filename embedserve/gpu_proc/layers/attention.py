"""Attention over packed, unpadded sequences, behind one interface.

A batch is the concatenation of its sequences' tokens: q/k/v are [tokens, heads, head_dim] and
`ForwardContext.cu_seqlens` says where each sequence starts. The runner builds the context once per
forward (`make_forward_context`) and installs it with `forward_context`; every `Attention` layer reads
it from there, so model code never threads batch metadata through its calls.

    tokens:      | s0 s0 s0 | s1 s1 | s2 s2 s2 s2 |
    cu_seqlens:  0          3       5             9

With a `KvBatch` (radix prefix cache, chunked prefill) the tokens are only each sequence's *new*
ones: every layer writes their K/V into the pool rows `new_slots` and they attend, causally, over
the sequence's cached prefix (pool rows `prefix_slots`, page size 1) followed by themselves:

    sequence b sees:  | pool[prefix slot 0] .. pool[prefix slot p-1] | new 0 .. new i |   (p = prefix_lens[b])

Backends (`get_attention_backend`): `torch` (SDPA per sequence; the portable path and the reference),
`cpu` (`attention_cpu.py`: embedserve's C kernel, one call per layer), `triton` (`attention_triton.py`:
the extend-attention kernel, one launch per layer) and `flashinfer` (`attention_flashinfer.py`:
FlashInfer's ragged / paged prefill, planned once per batch).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedserve.kernels import extend_attention
from embedserve.startup_error import StartupError

logger = logging.getLogger(__name__)


@dataclass
class KvBatch:
    """Where a batch's tokens live in the KV pool: host arrays, as the scheduler hands them over.

    NOTE: a new token's slot must not be a prefix slot of any sequence in the same batch: every
    layer writes all new K/V before any sequence reads its prefix.
    """

    # int32 [B]: tokens of each sequence already in the KV pool
    prefix_lens: np.ndarray
    # int32 [sum(prefix_lens)]: pool slot of every prefix token, in order, sequences concatenated
    prefix_slots: np.ndarray
    # int32 [T]: pool slot where each new token's K/V must be written, in packed token order
    new_slots: np.ndarray


@dataclass
class KvContext:
    """A `KvBatch` on the model's device, as the attention layers read it."""

    prefix_lens: torch.Tensor  # int32 [B]
    page_table: torch.Tensor  # int32 [B, max(prefix_lens)]: b's prefix slots, then 0s that are never read
    new_slots: torch.Tensor  # int64 [T]
    host: KvBatch  # the same batch on the host, for backends that plan on the CPU without a device sync

    @classmethod
    def from_batch(cls, kv: KvBatch, device: torch.device | str) -> KvContext:
        # NOTE: np.array copies: the arrays may be read-only views of a message (from_numpy warns).
        lens = np.array(kv.prefix_lens, dtype=np.int32)
        table = np.zeros((len(lens), int(lens.max(initial=0))), dtype=np.int32)
        # NOTE: a boolean mask fills in row-major order: sequence 0's slots, then sequence 1's, ...
        table[np.arange(table.shape[1]) < lens[:, None]] = kv.prefix_slots
        return cls(
            prefix_lens=torch.from_numpy(lens).to(device),
            page_table=torch.from_numpy(table).to(device),
            new_slots=torch.from_numpy(np.array(kv.new_slots, dtype=np.int64)).to(device),
            host=kv,
        )


@dataclass
class ForwardContext:
    seq_lens: tuple[int, ...]  # host copy: tokens of each sequence, in packed order
    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1] on the model's device; cu_seqlens[-1] == num_tokens
    max_seqlen: int
    causal: bool  # True: a token sees only earlier tokens of its sequence (decoders)
    backend: AttentionBackend
    plan: Any = None  # the backend's per-batch precomputation, shared by every layer
    kv: KvContext | None = None  # set: the tokens extend cached prefixes and write the KV pool

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)


class AttentionBackendUnavailable(StartupError):
    """The backend asked for cannot run on this device, dtype or model; the message says why."""


class AttentionBackend(ABC):
    """Computes attention for every sequence of a packed batch; one instance serves all layers.

    NOTE: one batch at a time: `plan` may keep per-batch state on the instance (FlashInfer's wrappers).
    """

    name: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @classmethod
    def unavailable(cls, device: torch.device, dtype: torch.dtype | None) -> str | None:
        """Why this backend cannot run on `device` in `dtype` (None: unknown yet), or None if it can."""
        return None

    def configure(self, layers: Sequence[Attention], dtype: torch.dtype) -> None:
        """Called once, before any batch, with the model's attention layers and dtype.

        Raises `AttentionBackendUnavailable` where the backend cannot serve this model.
        """
        return None

    def plan(self, ctx: ForwardContext) -> Any:
        """Per-batch work that does not depend on the layer (index tensors, kernel plans)."""
        return None

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        """q: [tokens, layer.num_heads, head_dim]; k, v: [tokens, layer.num_kv_heads, head_dim].

        Returns [tokens, layer.num_heads, head_dim]; token i attends only within its own sequence.
        """

    @abstractmethod
    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        """As `forward`, for new tokens that also attend to their prefix in `layer.k_cache/v_cache`.

        `ctx.kv` is set and the new tokens' k/v are already in the pool; the shapes are as in `forward`.
        """


class Attention(nn.Module):
    """The attention step of a transformer layer; which kernel runs is the context's backend.

    `k_cache`/`v_cache` [pool tokens, num_kv_heads, head_dim] are this layer's share of the KV pool,
    set by `ModelRunner.allocate_kv_pool`; only batches with a `KvBatch` touch them.
    """

    def __init__(
        self, num_heads: int, head_dim: int, num_kv_heads: int | None = None, scale: float | None = None
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads} query heads cannot share {self.num_kv_heads} kv heads evenly")
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if ctx.kv is None:
            return ctx.backend.forward(q, k, v, self, ctx)
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("a batch with a KvBatch ran before the KV pool was allocated")
        self.k_cache.index_copy_(0, ctx.kv.new_slots, k)
        self.v_cache.index_copy_(0, ctx.kv.new_slots, v)
        return ctx.backend.forward_extend(q, k, v, self, ctx)


_local = threading.local()  # NOTE: per thread: the executor may run two batches at once


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Makes `ctx` the batch that every `Attention` layer sees until the block exits."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("Attention ran outside `forward_context(...)`: no batch metadata is set")
    return ctx


def make_forward_context(
    seq_lens: Sequence[int],
    causal: bool,
    backend: AttentionBackend,
    device: torch.device | str,
    kv: KvBatch | None = None,
) -> ForwardContext:
    lens = tuple(int(n) for n in seq_lens)
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    ctx = ForwardContext(
        seq_lens=lens,
        cu_seqlens=torch.from_numpy(cu).to(device),
        max_seqlen=max(lens, default=0),
        causal=causal,
        backend=backend,
        kv=KvContext.from_batch(kv, device) if kv is not None else None,
    )
    ctx.plan = backend.plan(ctx)
    return ctx


class TorchAttention(AttentionBackend):
    """`F.scaled_dot_product_attention` once per sequence, on views of the packed tensors; over a KV
    pool, `kernels.extend_attention` (Triton on CUDA, its torch reference elsewhere).

    NOTE: measured on 2 Zen 4 cores, one MiniLM layer over 4,096 tokens of ~50 sequences of 5-250
    tokens: ~21 ms per sequence, the same when equal-length sequences share a call (few do), the same
    with contiguous copies, and ~100 ms padded to the longest sequence with a mask. Slices need no copy.
    """

    name = "torch"

    def plan(self, ctx: ForwardContext) -> list[tuple[int, int]]:
        # NOTE: from the host copy of the lengths: reading cu_seqlens back would sync with the device.
        return list(itertools.pairwise(itertools.accumulate(ctx.seq_lens, initial=0)))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        if layer.num_kv_heads != layer.num_heads:
            # NOTE: repeat rather than SDPA's `enable_gqa`, which torch < 2.5 lacks; this backend is the
            # portable reference, the GPU backends handle grouped heads natively.
            group = layer.num_heads // layer.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.empty_like(q)
        for start, end in ctx.plan:
            # [len, heads, dim] -> [1, heads, len, dim]: SDPA's layout, as a view
            qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=ctx.causal, scale=layer.scale)
            out[start:end] = o[0].transpose(0, 1)
        return out

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, ctx: ForwardContext
    ) -> torch.Tensor:
        assert ctx.kv is not None and layer.k_cache is not None and layer.v_cache is not None
        return extend_attention(
            q, k, v, layer.k_cache, layer.v_cache, ctx.cu_seqlens, ctx.kv.prefix_lens, ctx.kv.page_table,
            causal=ctx.causal, sm_scale=layer.scale,
        )  # fmt: skip


# name -> "module:class". NOTE: by path, not by class: the GPU backends' modules import this one.
ATTENTION_BACKENDS: dict[str, str] = {
    "torch": f"{__name__}:TorchAttention",
    "cpu": "embedserve.gpu_proc.layers.attention_cpu:CpuAttention",
    "triton": "embedserve.gpu_proc.layers.attention_triton:TritonAttention",
    "flashinfer": "embedserve.gpu_proc.layers.attention_flashinfer:FlashInferAttention",
}
# What `auto` tries, in order, before torch. On the CPU triton never: its interpreter is for tests
# only. NOTE: triton first on CUDA: it is what ran the H200 figures in docs/benchmarks.md, while
# FlashInfer without its JIT cache compiled kernels for minutes at start-up there; it stays a choice.
AUTO_ON_CUDA = ("triton", "flashinfer")
# On the CPU: embedserve's C kernel where a compiler built it, else torch.
AUTO_ON_CPU = ("cpu",)


def get_attention_backend(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    layers: Sequence[Attention] = (),
) -> AttentionBackend:
    """The backend `name` (or `auto`'s pick) for `device`, configured for `layers` when given.

    auto: triton on CUDA when it imports and serves this model, else flashinfer on CUDA when it
    does; on the CPU the C kernel (`cpu`) when it builds; else torch. An explicit name that cannot
    run here raises `AttentionBackendUnavailable`.
    """
    device = torch.device(device)
    if name != "auto":
        return _build(name, device, dtype, layers)
    for candidate in AUTO_ON_CUDA if device.type == "cuda" else AUTO_ON_CPU if device.type == "cpu" else ():
        try:
            return _build(candidate, device, dtype, layers)
        except AttentionBackendUnavailable as exc:
            logger.info("Attention backend %s skipped: %s", candidate, exc)
    return _build("torch", device, dtype, layers)


def _build(
    name: str, device: torch.device, dtype: torch.dtype | None, layers: Sequence[Attention]
) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose auto or one of {sorted(ATTENTION_BACKENDS)}"
        )
    module, _, cls_name = ATTENTION_BACKENDS[name].partition(":")
    cls: type[AttentionBackend] = getattr(importlib.import_module(module), cls_name)
    reason = cls.unavailable(device, dtype)
    if reason is not None:
        raise AttentionBackendUnavailable(f"attention backend {name!r} cannot run here: {reason}")
    backend = cls(device)
    if layers:
        backend.configure(layers, dtype if dtype is not None else torch.get_default_dtype())
    return backend
