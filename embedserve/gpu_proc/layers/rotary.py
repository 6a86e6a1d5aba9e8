"""Rotary position embedding for q and k of packed tokens, configured from config.json."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from embedserve.kernels import apply_rotary_, rotary_cos_sin_cache


def rope_theta(cfg: dict[str, Any]) -> float:
    """The rotary base, from transformers >= 5's `rope_parameters` or the older top-level `rope_theta`.

    NOTE: only plain rotary is served; a scaled one (`linear`, `yarn`, `llama3`, ...) would embed
    long inputs differently from the reference, so it is refused rather than ignored.
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported rope type {rope_type!r}: only unscaled rotary embeddings are served")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


class RotaryEmbedding(nn.Module):
    """Rotates q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place (neox layout).

    NOTE: the cos/sin table is built on the first forward, on the device of the inputs, not here: the
    model is built on the meta device and `to_empty`-ed, which would leave a buffer uninitialised.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float, rotary_dim: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        self.max_positions = max_positions
        self.base = base
        self._cos_sin: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        if self._cos_sin is None or self._cos_sin.device != q.device:
            self._cos_sin = rotary_cos_sin_cache(self.max_positions, self.rotary_dim, self.base, q.device)
        apply_rotary_(q, k, positions, self._cos_sin, is_neox=True)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], head_dim: int) -> RotaryEmbedding:
        rotary_dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
        return cls(head_dim, int(cfg.get("max_position_embeddings", 32768)), rope_theta(cfg), rotary_dim)
