"""The executor's BERT against the real references: sentence-transformers' embeddings, HF checkpoints.

Token ids come from `AutoTokenizer`, as the tokenizer process produces them; every expected value comes
from sentence-transformers or plain math, never from our own model.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from texts import mixed_texts
from tiny_models import TOKENIZER_FILES, write_sentence_transformers_files
from transformers import AutoTokenizer, BertConfig, BertModel

from embedserve.gpu_proc.layers.attention import (
    Attention,
    TorchAttention,
    forward_context,
    make_forward_context,
)
from embedserve.gpu_proc.model_runner import ModelRunner
from embedserve.gpu_proc.models.registry import get_model_class
from embedserve.gpu_proc.weight_loader import WeightLoadError
from embedserve.model_config import load_model_config


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def make_runner(folder: str | Path, dtype: str = "float32") -> ModelRunner:
    return ModelRunner(load_model_config(str(folder)), device="cpu", dtype=dtype)


def reference(folder: str | Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)


def embed(runner: ModelRunner, token_lists: list[list[int]]) -> np.ndarray:
    ids = np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists])
    return runner.embed(ids, [len(t) for t in token_lists])


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # NOTE: the last text runs past 256 tokens, so truncation is exercised too.
    return [*mixed_texts(60, seed=1), " ".join(mixed_texts(10, seed=2)[1::2])]


@pytest.fixture(scope="module")
def tokens(bundled_model_path: Path, texts: list[str]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path))
    return tokenizer(texts, truncation=True, max_length=256)["input_ids"]


@pytest.fixture(scope="module")
def minilm_reference(bundled_model_path: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(bundled_model_path), device="cpu")
    return st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="module")
def minilm(bundled_model_path: Path) -> ModelRunner:
    return make_runner(bundled_model_path)


@pytest.fixture(scope="module")
def minilm_batched(minilm: ModelRunner, tokens: list[list[int]]) -> np.ndarray:
    return embed(minilm, tokens)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path):
    """`tiny_bert(pooling, normalize) -> folder`: a 2-layer random BERT that sentence-transformers loads."""
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    with torch.no_grad():
        # NOTE: HF starts LayerNorms at 1/0 and biases at 0; perturb them so that a tensor loaded into
        # another one's place cannot go unnoticed.
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    built: dict[tuple[str, bool], Path] = {}

    def build(pooling: str = "cls", normalize: bool = False) -> Path:
        if (pooling, normalize) not in built:
            folder = tmp_path_factory.mktemp(f"tiny_bert_{pooling}_{normalize}")
            model.save_pretrained(folder)
            for name in TOKENIZER_FILES:
                shutil.copy(Path(bundled_model_path) / name, folder / name)
            write_sentence_transformers_files(folder, config.hidden_size, pooling, normalize)
            built[(pooling, normalize)] = folder
        return built[(pooling, normalize)]

    return build


def test_minilm_batch_matches_sentence_transformers(minilm_batched, minilm_reference, tokens):
    assert len(tokens) >= 50 and min(map(len, tokens)) <= 4 and max(map(len, tokens)) == 256
    assert minilm_batched.dtype == np.float32 and minilm_batched.shape == (len(tokens), 384)
    assert cosine(minilm_batched, minilm_reference).min() >= 0.99999


def test_minilm_one_at_a_time_matches_sentence_transformers_and_the_batch(
    minilm, tokens, minilm_reference, minilm_batched
):
    singles = np.concatenate([embed(minilm, [t]) for t in tokens])
    assert cosine(singles, minilm_reference).min() >= 0.99999
    np.testing.assert_allclose(singles, minilm_batched, atol=1e-5)


def test_minilm_bfloat16_stays_close_to_the_float32_reference(bundled_model_path, tokens, minilm_reference):
    runner = make_runner(bundled_model_path, dtype="bfloat16")
    assert runner.torch_dtype == torch.bfloat16
    assert cosine(embed(runner, tokens), minilm_reference).min() >= 0.999


def test_embed_rejects_lengths_that_do_not_add_up(minilm):
    with pytest.raises(ValueError, match="add up"):
        minilm.embed(np.arange(5, dtype=np.int32), [2, 2])


# --- tiny random BERTs: every pooling, with and without normalisation ------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_tiny_bert_matches_sentence_transformers(tiny_bert, bundled_model_path, texts, pooling, normalize):
    folder = tiny_bert(pooling, normalize)
    some = texts[:20]
    tokens = AutoTokenizer.from_pretrained(str(folder))(some, truncation=True, max_length=256)["input_ids"]
    expected = reference(folder, some)
    ours = embed(make_runner(folder), tokens)
    assert cosine(ours, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-4)


def test_load_is_logged_with_type_dtype_and_size(tiny_bert, caplog):
    with caplog.at_level(logging.INFO, logger="embedserve.gpu_proc.model_runner"):
        make_runner(tiny_bert())
    assert "Load weight begin." in caplog.messages
    assert any(
        re.fullmatch(r"Load weight end\. type=BertModel, dtype=torch\.float32, mem usage=\d+\.\d\d GB\.", m)
        for m in caplog.messages
    )


# --- checkpoint layouts and mismatches --------------------------------------------------------------


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    return dst


def _bert_prefix(src: Path, dst: Path) -> None:
    weights = load_file(src / "model.safetensors")
    save_file({f"bert.{k}": v for k, v in weights.items()}, dst / "model.safetensors")


def _sharded(src: Path, dst: Path) -> None:
    BertModel.from_pretrained(src).save_pretrained(dst, max_shard_size="1MB")
    assert len(list(dst.glob("model-*.safetensors"))) >= 2


def _pytorch_bin(src: Path, dst: Path) -> None:
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")


@pytest.mark.parametrize(
    "write", [_bert_prefix, _sharded, _pytorch_bin], ids=["bert_prefix", "sharded", "bin"]
)
def test_checkpoint_layouts_load_the_same_weights(tiny_bert, tmp_path, texts, write):
    src = tiny_bert()
    dst = _copy_without_weights(src, tmp_path / "model")
    write(src, dst)
    tokens = AutoTokenizer.from_pretrained(str(src))(texts[:8])["input_ids"]
    assert cosine(embed(make_runner(dst), tokens), reference(src, texts[:8])).min() >= 0.9999


def test_missing_tensor_is_named(tiny_bert, tmp_path):
    src = tiny_bert()
    dst = _copy_without_weights(src, tmp_path / "model")
    weights = load_file(src / "model.safetensors")
    del weights["encoder.layer.1.attention.self.key.weight"], weights["embeddings.LayerNorm.bias"]
    save_file(weights, dst / "model.safetensors")
    with pytest.raises(
        WeightLoadError, match=r"missing.*embeddings\.LayerNorm\.bias.*layer\.1\.attention\.self\.key\.weight"
    ):
        make_runner(dst)


def test_unexpected_tensor_is_named(tiny_bert, tmp_path):
    src = tiny_bert()
    dst = _copy_without_weights(src, tmp_path / "model")
    weights = load_file(src / "model.safetensors")
    weights["encoder.layer.0.adapter.weight"] = torch.zeros(2)
    save_file(weights, dst / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"not used by the model: encoder\.layer\.0\.adapter\.weight"):
        make_runner(dst)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"'GPT2Model'.*BertModel"):
        get_model_class("GPT2Model")


# --- the attention interface, beyond what BERT uses -------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_torch_attention_matches_per_sequence_softmax_with_grouped_kv_heads(causal):
    lens, heads, kv_heads, dim = [1, 5, 17, 5], 4, 2, 8
    torch.manual_seed(0)
    q = torch.randn(sum(lens), heads, dim)
    k, v = torch.randn(2, sum(lens), kv_heads, dim).unbind(0)
    with forward_context(make_forward_context(lens, causal, TorchAttention(), "cpu")):
        out = Attention(heads, dim, num_kv_heads=kv_heads)(q, k, v)
    start = 0
    for n in lens:
        for h in range(heads):
            qs, ks, vs = (t[start : start + n, hh] for t, hh in ((q, h), (k, h // 2), (v, h // 2)))
            scores = qs @ ks.T / dim**0.5
            if causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            torch.testing.assert_close(out[start : start + n, h], scores.softmax(-1) @ vs)
        start += n
