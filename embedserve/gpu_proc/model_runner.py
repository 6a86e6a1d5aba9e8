"""Builds the model on its device and turns packed token ids into pooled embeddings."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from embedserve.gpu_proc.layers.attention import forward_context, get_attention_backend, make_forward_context
from embedserve.gpu_proc.layers.pooling import Pooler
from embedserve.gpu_proc.models.registry import get_model_class
from embedserve.gpu_proc.weight_loader import load_weights
from embedserve.model_config import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    """The model of one executor process: `embed(token ids, lengths) -> float32 [num_seqs, hidden]`."""

    def __init__(self, config: ModelConfig, device: str, dtype: str, num_threads: int | None = None):
        if device == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.config = config
        self.device = torch.device(device)
        self.torch_dtype = resolve_dtype(dtype, config.hf_config, device)
        self.hidden_size = config.hidden_size
        self.model = _load_model(config, self.device, self.torch_dtype)
        self.attention_backend = get_attention_backend("torch")
        self.pooler = Pooler(config.pooling, config.normalize)

    @torch.inference_mode()
    def embed(self, input_ids: np.ndarray, seq_lens: Sequence[int]) -> np.ndarray:
        """input_ids: every sequence's ids concatenated; returns one float32 row per sequence."""
        lens = np.asarray(seq_lens, dtype=np.int64)
        _check_batch(input_ids, lens, self.config.context_length)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device, non_blocking=True)
        positions = torch.from_numpy(_positions(lens)).to(self.device, non_blocking=True)
        ctx = make_forward_context(lens.tolist(), self.config.is_causal, self.attention_backend, self.device)
        with forward_context(ctx):
            hidden = self.model(ids, positions)
        return self.pooler(hidden, ctx.cu_seqlens).cpu().numpy()


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
    with _default_dtype(dtype), device:
        model = get_model_class(config.architecture)(config.hf_config)
    load_weights(model, config.path)
    model.eval()
    size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    logger.info(
        "Load weight end. type=%s, dtype=%s, mem usage=%.2f GB.", type(model).__name__, dtype, size_gb
    )
    return model


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


def _positions(lens: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at every sequence: [3, 2] -> [0, 1, 2, 0, 1]."""
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(int(lens.sum()), dtype=np.int64) - starts
