"""Copies a Hugging Face checkpoint into a model built by `models/`, by parameter name.

Checkpoint names are matched to the model's after dropping a task-head prefix (`bert.`, `model.`, ...)
and renaming fused projections: a model's `packed_modules_mapping = {"query": ("qkv_proj", 0), ...}`
says the checkpoint's `...self.query.weight` is shard 0 of the model's `...self.qkv_proj.weight`.
Each parameter copies its tensor with its own `weight_loader(param, tensor[, shard_id])`, so fused
layers need no per-model loading code. Every parameter (and every shard) must be loaded exactly from
the checkpoint, and every checkpoint tensor must be used or known to be unused: anything else raises.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from embedserve.startup_error import StartupError

# NOTE: tqdm's default lock is a multiprocessing semaphore, which the launcher's resource tracker
# then reports as leaked when the executor is stopped; a thread lock is all one process needs.
tqdm.set_lock(threading.RLock())

# Task-head wrappers whose encoder/decoder weights we serve: "bert.encoder.layer.0..." -> "encoder.layer.0..."
_WRAPPER_PREFIXES = ("bert.", "roberta.", "model.", "transformer.")
# Checkpoint tensors that no embedding model uses: heads, and buffers saved by old transformers versions.
_UNUSED_PREFIXES = ("pooler.", "lm_head.", "cls.")
_UNUSED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
_BAR_FORMAT = "{desc}: {percentage:3.0f}% Completed | {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"

PackedMapping = dict[str, tuple[str, int]]


class WeightLoadError(StartupError):
    """The checkpoint does not fit the model: missing, unexpected or misshapen tensors."""


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise WeightLoadError(
            f"shape {tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} in the model"
        )
    param.data.copy_(tensor)


def packed_weight_loader(shard_sizes: Sequence[int], dim: int = 0) -> Callable[..., None]:
    """A loader that copies shard `i` into rows offsets[i]:offsets[i] + shard_sizes[i] of a fused param."""
    offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]

    def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int) -> None:
        target = param.data.narrow(dim, offsets[shard_id], shard_sizes[shard_id])
        if target.shape != tensor.shape:
            raise WeightLoadError(
                f"shard {shard_id}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(target.shape)} expected"
            )
        target.copy_(tensor)

    return load


def set_packed_weight_loader(module: nn.Module, shard_sizes: Sequence[int]) -> None:
    """Marks every parameter of a fused layer (weight, bias) as the concatenation of `shard_sizes` rows."""
    for param in module.parameters(recurse=False):
        param.weight_loader = packed_weight_loader(shard_sizes)  # type: ignore[attr-defined]


def load_weights(model: nn.Module, folder: str) -> None:
    """Fills every parameter of `model` from the checkpoint in `folder`; raises WeightLoadError on mismatch."""
    params = dict(model.named_parameters())
    packed: PackedMapping = getattr(model, "packed_modules_mapping", {})
    expected = _expected_keys(params, packed)
    loaded: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    files = checkpoint_files(Path(folder))
    for file in tqdm(
        files, desc="Loading safetensors checkpoint shards", bar_format=_BAR_FORMAT, file=sys.stderr
    ):
        for name, tensor in _read_tensors(file):
            key = _resolve(name, params, packed)
            if key is None:
                continue
            if key not in expected:
                unexpected.append(name)
                continue
            _load_one(params[key[0]], tensor, key, name)
            loaded.add(key)
    _check_complete(expected - loaded, unexpected, packed, folder)


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint: sharded or single safetensors, else PyTorch pickles."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise WeightLoadError(
        f"{folder} holds no model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
    else:
        # NOTE: weights_only refuses pickled code: a checkpoint is data, never something to execute.
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def _resolve(
    name: str, params: dict[str, nn.Parameter], packed: PackedMapping
) -> tuple[str, int | None] | None:
    """(model parameter, shard id) for a checkpoint tensor; None when the tensor is known to be unused."""
    for candidate in (name, *(name[len(p) :] for p in _WRAPPER_PREFIXES if name.startswith(p))):
        if candidate.startswith(_UNUSED_PREFIXES) or candidate.endswith(_UNUSED_SUFFIXES):
            return None
        key = _apply_packing(candidate, packed)
        if key[0] in params:
            return key
    return (name, None)


def _apply_packing(name: str, packed: PackedMapping) -> tuple[str, int | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            target, shard_id = packed[part]
            return ".".join([*parts[:i], target, *parts[i + 1 :]]), shard_id
    return name, None


def _expected_keys(params: dict[str, nn.Parameter], packed: PackedMapping) -> set[tuple[str, int | None]]:
    shards: dict[str, list[int]] = {}
    for target, shard_id in packed.values():
        shards.setdefault(target, []).append(shard_id)
    expected: set[tuple[str, int | None]] = set()
    for name in params:
        fused = next((p for p in name.split(".") if p in shards), None)
        if fused is None:
            expected.add((name, None))
        else:
            expected.update((name, s) for s in shards[fused])
    return expected


def _load_one(param: nn.Parameter, tensor: torch.Tensor, key: tuple[str, int | None], name: str) -> None:
    loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
    try:
        if key[1] is None:
            loader(param, tensor)
        else:
            loader(param, tensor, key[1])
    except WeightLoadError as exc:
        raise WeightLoadError(
            f"checkpoint tensor {name!r} does not fit parameter {key[0]!r}: {exc}"
        ) from None


def _check_complete(
    missing: set[tuple[str, int | None]], unexpected: list[str], packed: PackedMapping, folder: str
) -> None:
    problems = []
    if missing:
        names = sorted(_checkpoint_name(key, packed) for key in missing)
        problems.append(f"missing from the checkpoint: {', '.join(names)}")
    if unexpected:
        problems.append(f"not used by the model: {', '.join(sorted(unexpected))}")
    if problems:
        raise WeightLoadError(f"checkpoint {folder} does not match the model; " + "; ".join(problems))


def _checkpoint_name(key: tuple[str, int | None], packed: PackedMapping) -> str:
    """The name a checkpoint would use for a (parameter, shard): `qkv_proj` shard 1 -> `key`."""
    name, shard_id = key
    if shard_id is None:
        return name
    parts = name.split(".")
    for source, (target, sid) in packed.items():
        if sid == shard_id and target in parts:
            return ".".join(source if p == target else p for p in parts)
    return f"{name}[shard {shard_id}]"
