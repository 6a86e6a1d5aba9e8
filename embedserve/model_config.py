"""What every process needs to know about the model, read from its folder without importing torch.

The folder is a Hugging Face checkpoint, optionally with sentence-transformers' files
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`) that declare pooling,
normalisation and the longest input the model was trained for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedserve.log import into_our_log
from embedserve.startup_error import StartupError, one_line

if TYPE_CHECKING:
    from embedserve.server_args import ServerArgs

# Families that attend bidirectionally and pool the first token unless the folder says otherwise.
_ENCODER_ARCHITECTURES = {"BertModel", "XLMRobertaModel"}
# `architectures[0]` values the executor has a model class for (gpu_proc/models/registry.py, which a
# test keeps equal to this): checked here, before any process starts, not when the executor builds it.
SUPPORTED_ARCHITECTURES = frozenset(
    {
        *_ENCODER_ARCHITECTURES,
        *(
            f"{family}{kind}"
            for family in ("Llama", "Mistral", "Qwen2", "Qwen3")
            for kind in ("Model", "ForCausalLM")
        ),
    }
)


class ModelConfigError(StartupError):
    """The model folder is missing, unreadable or declares something this server cannot serve."""


@dataclass(frozen=True)
class ModelConfig:
    path: str  # local folder holding config.json and the weights
    architecture: str  # first entry of config.json's `architectures`
    hf_config: dict[str, Any]
    pooling: str  # "cls" | "mean" | "last"
    normalize: bool  # L2-normalise the pooled vector (sentence-transformers' Normalize module)
    context_length: int  # longest input in tokens, special tokens included

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def is_causal(self) -> bool:
        return self.architecture not in _ENCODER_ARCHITECTURES


def resolve_model_folder(path_or_id: str, what: str = "model path") -> str:
    """A local folder for `path_or_id`: the folder itself, else the HF cache, else a download."""
    # NOTE: a shell leaves `~` as it is after `--model-path=`, and so do systemd units and k8s args.
    path_or_id = os.path.expanduser(path_or_id)
    if os.path.isdir(path_or_id):
        return os.path.abspath(path_or_id)
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise ModelConfigError(f"{what} {path_or_id!r} is not a folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ModelConfigError(f"{path_or_id!r} is not a folder and huggingface_hub is missing") from exc
    into_our_log("huggingface_hub")
    try:
        return snapshot_download(path_or_id, local_files_only=True)
    except Exception as cached_miss:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ModelConfigError(
                f"{path_or_id!r} is not a folder and not in the local Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so it was not downloaded)"
            ) from cached_miss
    try:
        return snapshot_download(path_or_id)
    except Exception as exc:
        raise ModelConfigError(
            f"{path_or_id!r} is not a folder, not in the local Hugging Face cache, and could not be "
            f"downloaded: {one_line(exc)}"
        ) from exc


def model_config_from_args(args: ServerArgs) -> ModelConfig:
    """The model as the server's flags shape it (context length, pooling, config overrides)."""
    return load_model_config(
        args.model_path, args.context_length, args.pooling, args.json_model_override_args
    )


def load_model_config(
    model_path: str, context_length: int | None = None, pooling: str | None = None, overrides: str = "{}"
) -> ModelConfig:
    folder = resolve_model_folder(model_path)
    hf_config = {**_read_json(Path(folder) / "config.json", required=True), **_parse_overrides(overrides)}
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise ModelConfigError(f"{folder}/config.json names no architecture")
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{folder}: unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    missing = [key for key in ("hidden_size", "vocab_size") if not isinstance(hf_config.get(key), int)]
    if missing:
        raise ModelConfigError(f"{folder}/config.json has no integer {' or '.join(missing)}")
    pooling, normalize = _read_pooling(Path(folder), architecture, pooling)
    limit = _model_context_limit(Path(folder), hf_config, architecture)
    if context_length is not None and context_length > _position_limit(hf_config, architecture):
        raise ModelConfigError(
            f"--context-length {context_length} exceeds the model's position table "
            f"({_position_limit(hf_config, architecture)} tokens)"
        )
    return ModelConfig(
        path=folder,
        architecture=architecture,
        hf_config=hf_config,
        pooling=pooling,
        normalize=normalize,
        context_length=context_length or limit,
    )


def _parse_overrides(text: str) -> dict[str, Any]:
    try:
        overrides = json.loads(text or "{}")
    except ValueError as exc:
        raise ModelConfigError(f"--json-model-override-args is not valid JSON: {exc}") from exc
    if not isinstance(overrides, dict):
        raise ModelConfigError("--json-model-override-args must be a JSON object")
    return overrides


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelConfigError(f"{path} not found: is this a model folder?")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot read {path}: {exc}") from exc


def _read_pooling(folder: Path, architecture: str, chosen: str | None) -> tuple[str, bool]:
    """Pooling mode (`chosen` by --pooling, else as sentence-transformers declares it, else the family
    default) and normalisation."""
    pooling = chosen or ("cls" if architecture in _ENCODER_ARCHITECTURES else "last")
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return pooling, False
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    if chosen is not None:
        return chosen, normalize
    for module in modules:
        if not str(module.get("type", "")).endswith("Pooling"):
            continue
        config = folder / module.get("path", "1_Pooling") / "config.json"
        if not config.is_file():
            raise ModelConfigError(
                f"{config} not found, though modules.json lists a pooling module there: restore it, "
                "or choose the pooling with --pooling cls|mean|last"
            )
        pooling = _pooling_mode(_read_json(config))
    return pooling, normalize


def _pooling_mode(config: dict[str, Any]) -> str:
    modes = {
        "cls": config.get("pooling_mode_cls_token", False),
        "mean": config.get("pooling_mode_mean_tokens", False),
        "last": config.get("pooling_mode_lasttoken", False),
    }
    unsupported = [
        k
        for k in (
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
        )
        if config.get(k)
    ]
    chosen = [name for name, on in modes.items() if on]
    if unsupported or len(chosen) != 1:
        raise ModelConfigError(
            f"unsupported pooling configuration {config}: exactly one of cls, mean or lasttoken is served"
        )
    return chosen[0]


def _position_limit(hf_config: dict[str, Any], architecture: str) -> int:
    limit = int(hf_config.get("max_position_embeddings", 512))
    if architecture == "XLMRobertaModel":
        # NOTE: RoBERTa positions start after padding_idx, so two table rows are never used.
        limit -= int(hf_config.get("pad_token_id", 1)) + 1
    return limit


def _model_context_limit(folder: Path, hf_config: dict[str, Any], architecture: str) -> int:
    st_config = _read_json(folder / "sentence_bert_config.json")
    declared = st_config.get("max_seq_length")
    limit = _position_limit(hf_config, architecture)
    return min(int(declared), limit) if declared else limit
