"""Builds the model on its device and turns packed token ids into pooled embeddings.

A batch is either fresh, every sequence whole (`embed(ids, lens)`, any model), or an extension
(`embed(ids, lens, kv)`): only each sequence's new tokens, attending to a prefix whose K/V a previous
batch left in the KV pool (radix prefix cache, chunked prefill; causal models with last-token pooling).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from embedserve.gpu_proc.cpu_threads import CoreShare, batch_threads
from embedserve.gpu_proc.layers.attention import (
    Attention,
    KvBatch,
    forward_context,
    get_attention_backend,
    make_forward_context,
)
from embedserve.gpu_proc.layers.linear import Linear
from embedserve.gpu_proc.layers.onednn import onednn_unavailable
from embedserve.gpu_proc.layers.pooling import Pooler
from embedserve.gpu_proc.models.registry import get_model_class
from embedserve.gpu_proc.token_buckets import pad_batch
from embedserve.gpu_proc.weight_loader import load_weights
from embedserve.model_config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["KvBatch", "ModelRunner", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GIB = 1 << 30  # NOTE: sizes are logged in GiB and labelled "GB", as SGLang's logs do


class ModelRunner:
    """The model of one executor process: `embed(token ids, lengths) -> float32 [num_seqs, hidden]`."""

    def __init__(
        self,
        config: ModelConfig,
        device: str,
        dtype: str,
        num_threads: int | None = None,
        attention_backend: str = "auto",
        pack_linears: bool = True,
        build_threads: int | None = None,
    ):
        """`build_threads`: threads for loading and packing (default: `num_threads`); the executor
        builds on one, so that only its lanes ever run OpenMP on several (see `CoreShare`)."""
        if device == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.max_threads = torch.get_num_threads()
        self.config = config
        self.device = torch.device(device)
        self.torch_dtype = resolve_dtype(dtype, config.hf_config, device)
        self.hidden_size = config.hidden_size
        if self.device.type == "cpu" and build_threads:
            torch.set_num_threads(build_threads)
        try:
            self.model = _load_model(config, self.device, self.torch_dtype)
            linear_flops = _linear_flops_per_token(self.model)  # NOTE: before packing, which drops weights
            if self.device.type == "cpu" and pack_linears:
                _pack_linears_for_cpu(self.model, self.torch_dtype)
        finally:
            torch.set_num_threads(self.max_threads)
        self.last_forward_end = 0.0  # perf_counter() when the last forward ended: its threads' warmth
        _check_attention_window(self.model, config.context_length)
        self.pooler = Pooler(config.pooling, config.normalize)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.core_share = CoreShare(self.max_threads)
        if self.device.type == "cpu":
            # NOTE: before each layer, so a batch that started beside another takes every thread
            # once it runs alone (and gives half back when a second batch starts).
            for layer in self.attention_layers:
                layer.register_forward_pre_hook(lambda *_: self.core_share.rebalance())
        self.flops_per_token_per_layer = linear_flops / max(1, len(self.attention_layers))
        self.attention_backend = get_attention_backend(
            attention_backend, self.device, self.torch_dtype, self.attention_layers
        )
        logger.info("Attention backend: %s", self.attention_backend.name)
        self.kv_pool_tokens = 0
        # NOTE: on the CPU a batch runs at a rounded-up token count (token_buckets.py);
        # bench/token_buckets.py turns this off for its baseline.
        self.round_token_counts = self.device.type == "cpu"

    @property
    def supports_kv_cache(self) -> bool:
        """Whether `embed` takes a `KvBatch`: a causal model pooled from its last token.

        NOTE: the pool keeps a prefix's K/V, not its hidden states, so CLS or mean pooling could not
        see the prefix; and in an encoder a prefix token's K/V would depend on the tokens after it.
        """
        return self.config.is_causal and self.pooler.mode == "last"

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V that one pooled token takes, over all layers, in the model dtype."""
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return sum(2 * layer.num_kv_heads * layer.head_dim * elem for layer in self.attention_layers)

    def allocate_kv_pool(self, num_tokens: int) -> None:
        """Gives every attention layer K and V [num_tokens, num_kv_heads, head_dim]; pool slots are rows."""
        if not self.supports_kv_cache:
            raise ValueError("this model cannot reuse cached prefixes (supports_kv_cache is False)")
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = None  # NOTE: free the old pool before the new one exists
            shape = (num_tokens, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.empty(shape, dtype=self.torch_dtype, device=self.device)
            layer.v_cache = torch.empty(shape, dtype=self.torch_dtype, device=self.device)
        self.kv_pool_tokens = num_tokens
        k_gb = v_gb = num_tokens * self.kv_bytes_per_token / 2 / _GIB
        logger.info(
            "KV Cache is allocated. #tokens: %d, K size: %.2f GB, V size: %.2f GB", num_tokens, k_gb, v_gb
        )

    @torch.inference_mode()
    def embed(self, input_ids: np.ndarray, seq_lens: Sequence[int], kv: KvBatch | None = None) -> np.ndarray:
        """input_ids: every sequence's ids concatenated; returns one float32 row per sequence.

        With `kv`, the ids are only each sequence's new tokens, at positions prefix_lens[b] onwards;
        every layer writes their K/V to `kv.new_slots` and they attend over the cached prefix
        (`kv.prefix_slots`) and themselves. A row is then the pooled state of the sequence's last new
        token: the whole sequence's embedding when this batch holds its last chunk.
        """
        lens = np.asarray(seq_lens, dtype=np.int64)
        _check_batch(input_ids, lens, self.config.context_length)
        positions = _positions(lens)
        if kv is not None:
            if not self.supports_kv_cache:
                raise ValueError("this model cannot extend cached prefixes (supports_kv_cache is False)")
            _check_kv(kv, lens, self.config.context_length, self.kv_pool_tokens)
            positions += np.repeat(np.asarray(kv.prefix_lens, dtype=np.int64), lens)
        num_seqs, num_tokens = len(lens), len(input_ids)
        if self.round_token_counts and kv is None:  # NOTE: a KV batch's every token has a pool slot
            input_ids, lens, positions = pad_batch(input_ids, lens, positions)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device, non_blocking=True)
        ctx = make_forward_context(
            lens.tolist(), self.config.is_causal, self.attention_backend, self.device, kv
        )
        threads = self.max_threads
        if self.device.type == "cpu":
            idle_s = time.perf_counter() - self.last_forward_end
            threads = batch_threads(num_tokens, self.flops_per_token_per_layer, self.max_threads, idle_s)
        try:
            with forward_context(ctx), self.core_share.running_batch(threads):
                hidden = self.model(ids, torch.from_numpy(positions).to(self.device, non_blocking=True))
                return self.pooler(hidden, ctx.cu_seqlens)[:num_seqs].cpu().numpy()
        finally:
            self.last_forward_end = time.perf_counter()


def resolve_dtype(dtype: str, hf_config: dict[str, Any], device: str) -> torch.dtype:
    """auto: float32 on CPU; on CUDA the checkpoint's dtype, float32 checkpoints downcast to float16."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device == "cpu":
        return torch.float32
    # NOTE: transformers >= 5 writes "dtype", older versions "torch_dtype".
    saved = _DTYPES.get(
        str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"), torch.float32
    )
    if saved == torch.float32:
        logger.info("Downcasting torch.float32 to torch.float16.")
        return torch.float16
    return saved


def _load_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    logger.info("Load weight begin.")
    # NOTE: built on the meta device, then given uninitialised memory: randomly initialising billions
    # of weights only for the checkpoint to overwrite them costs longer than the load itself. The
    # loader fails unless every parameter is filled from the checkpoint.
    with _default_dtype(dtype), torch.device("meta"):
        model = get_model_class(config.architecture)(config.hf_config)
    _to_empty(model, device)
    load_weights(model, config.path)
    model.eval()
    size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / _GIB
    logger.info("Load weight end. type=%s, dtype=%s, mem usage=%.2f GB.", config.architecture, dtype, size_gb)
    return model


def _pack_linears_for_cpu(model: torch.nn.Module, dtype: torch.dtype) -> None:
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    reason = onednn_unavailable(torch.device("cpu"), dtype)
    if reason is not None:
        logger.info("Linear layers run through F.linear: %s", reason)
        return
    for linear in linears:
        linear.pack_for_cpu()
    logger.info("Linear layers packed for oneDNN: %d", len(linears))


def _linear_flops_per_token(model: torch.nn.Module) -> float:
    """2 x the multiply-adds of every linear layer for one token."""
    return 2.0 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear))


def _to_empty(model: torch.nn.Module, device: torch.device) -> None:
    """`model.to_empty(device)`, keeping what layers set on their parameters (`weight_loader`).

    NOTE: moving off the meta device makes new Parameter objects, which would drop those attributes.
    """
    attrs = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        vars(p).update(attrs[name])


def _check_attention_window(model: torch.nn.Module, context_length: int) -> None:
    window = getattr(model, "sliding_window", None)
    if window is not None and context_length > window:
        raise ValueError(
            f"the model attends within a sliding window of {window} tokens, which is not implemented: "
            f"serve it with --context-length {window} or less (now {context_length})"
        )


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _check_batch(input_ids: np.ndarray, lens: np.ndarray, context_length: int) -> None:
    if input_ids.ndim != 1 or lens.ndim != 1 or len(lens) == 0:
        raise ValueError("embed() takes 1-D input_ids and at least one sequence length")
    if lens.min() < 1 or lens.max() > context_length:
        raise ValueError(
            f"sequence lengths must be within 1..{context_length}, got {lens.min()}..{lens.max()}"
        )
    if lens.sum() != len(input_ids):
        raise ValueError(f"seq_lens add up to {lens.sum()} tokens but input_ids holds {len(input_ids)}")


def _check_kv(kv: KvBatch, lens: np.ndarray, context_length: int, pool_tokens: int) -> None:
    if pool_tokens == 0:
        raise ValueError("allocate_kv_pool() must run before a batch with a KvBatch")
    prefix = np.asarray(kv.prefix_lens, dtype=np.int64)
    if prefix.shape != lens.shape or prefix.min() < 0:
        raise ValueError(f"prefix_lens must hold one length >= 0 per sequence ({len(lens)}), got {prefix}")
    if len(kv.prefix_slots) != prefix.sum() or len(kv.new_slots) != lens.sum():
        raise ValueError(
            f"{len(kv.prefix_slots)} prefix slots for {prefix.sum()} prefix tokens, "
            f"{len(kv.new_slots)} new slots for {lens.sum()} new tokens"
        )
    if (prefix + lens).max() > context_length:
        raise ValueError(f"a prefix plus its new tokens exceeds the context length {context_length}")
    slots = np.concatenate([kv.prefix_slots, kv.new_slots])
    if slots.min() < 0 or slots.max() >= pool_tokens:
        raise ValueError(f"KV slots must be within 0..{pool_tokens - 1}, got {slots.min()}..{slots.max()}")


def _positions(lens: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at every sequence: [3, 2] -> [0, 1, 2, 0, 1]."""
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(int(lens.sum()), dtype=np.int64) - starts
