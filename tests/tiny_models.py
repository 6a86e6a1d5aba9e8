"""Tiny random-weight models of every served family, saved as folders sentence-transformers can load.

Each folder holds what a real checkpoint holds: config.json + model.safetensors written by
transformers' `save_pretrained`, the bundled MiniLM tokenizer (its ids stay below the 30522-row
vocabulary), and sentence-transformers' `modules.json`, `1_Pooling/config.json` and Normalize.

NOTE: transformers starts norms at 1 and biases at 0, and its 0.02 weights make every attention
almost uniform. Here weights are larger and norms and biases random, so that a swapped shard, a
missing bias or norm, or a wrong rotary shows in the embedding instead of washing out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_SEQ_LENGTH = 256

_ENCODER = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=30522
)
_DECODER = dict(
    _ENCODER,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    # NOTE: not the default 10000, so a rotary that ignores the config's base is caught.
    rope_theta=1000.0,
    tie_word_embeddings=False,
)

# family -> (the architecture it is saved as, its config class, config arguments)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertModel", "BertConfig", _ENCODER),
    # NOTE: XLM-R's real layout: one token type, pad id 1, positions 2..513 of a 514-row table.
    "xlm_roberta": (
        "XLMRobertaModel",
        "XLMRobertaConfig",
        dict(_ENCODER, type_vocab_size=1, pad_token_id=1, max_position_embeddings=514),
    ),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", _DECODER),
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DECODER),
    # NOTE: saved bare, as e5-mistral is; its window covers the whole context, as the server requires.
    "mistral": ("MistralModel", "MistralConfig", dict(_DECODER, sliding_window=MAX_SEQ_LENGTH)),
}
DECODERS = ("qwen2", "qwen3", "llama", "mistral")


def build_tiny_model(
    folder: Path, family: str, tokenizer_dir: Path, pooling: str, normalize: bool = True, seed: int = 0
) -> Path:
    """Writes a random `family` model to `folder`; pooling is "cls", "mean" or "last"."""
    architecture, config_class, kwargs = FAMILIES[family]
    config = getattr(transformers, config_class)(**kwargs, initializer_range=0.15)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    _randomise_norms_and_biases(model)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    write_sentence_transformers_files(folder, config.hidden_size, pooling, normalize)
    return folder


def bare_copy(src: Path, dst: Path, architecture: str) -> Path:
    """The `*ForCausalLM` checkpoint in `src` as its bare model: no `model.` prefix, no `lm_head`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(src / "model.safetensors")
    bare = {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("lm_head.")}
    save_file(bare, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    return dst


def write_sentence_transformers_files(folder: Path, dim: int, pooling: str, normalize: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ_LENGTH}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": dim,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_lasttoken": pooling == "last",
            }
        )
    )


@torch.no_grad()
def _randomise_norms_and_biases(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            param.copy_(1 + 0.3 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.copy_(0.3 * torch.randn_like(param))
