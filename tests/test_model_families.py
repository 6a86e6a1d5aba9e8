"""Every served architecture family against sentence-transformers, and the KV-pool path against itself.

Models are tiny and random (`tiny_models.py`); token ids come from `AutoTokenizer`, as the tokenizer
process produces them; every expected embedding comes from sentence-transformers (which runs the
transformers implementation), never from our own model, except where the KV path is checked against
the same runner's whole-sequence path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from texts import mixed_texts
from tiny_models import DECODERS, FAMILIES, bare_copy, build_tiny_model
from transformers import AutoTokenizer

from embedserve.gpu_proc.model_runner import KvBatch, ModelRunner
from embedserve.model_config import load_model_config

FAMILY_POOLINGS = [
    *((family, pooling) for family in ("bert", "xlm_roberta") for pooling in ("cls", "mean")),
    *((family, "last") for family in DECODERS),
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def make_runner(folder: Path, dtype: str = "float32", device: str = "cpu", **config) -> ModelRunner:
    return ModelRunner(load_model_config(str(folder), **config), device=device, dtype=dtype)


def embed(runner: ModelRunner, token_lists: list[list[int]]) -> np.ndarray:
    ids = np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists])
    return runner.embed(ids, [len(t) for t in token_lists])


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # NOTE: the last text runs past 256 tokens, so the longest sequence fills the context.
    return [*mixed_texts(16, seed=1), " ".join(mixed_texts(10, seed=2)[1::2])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path):
    """`tiny(family, pooling) -> folder`, built once per module."""
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, pooling: str = "last") -> Path:
        if (family, pooling) not in built:
            folder = tmp_path_factory.mktemp(f"{family}_{pooling}")
            built[family, pooling] = build_tiny_model(folder, family, bundled_model_path, pooling)
        return built[family, pooling]

    return get


@pytest.fixture(scope="module")
def tokens_of(texts):
    """`tokens_of(folder)`: the ids of `texts` from the folder's own `AutoTokenizer`, as sentence-transformers
    tokenizes them.

    NOTE: per folder, not once: transformers 5 gives a qwen2 folder its Qwen2Tokenizer even where
    tokenizer_config.json names BertTokenizer, and that one splits the same texts differently.
    """
    cache: dict[Path, list[list[int]]] = {}

    def get(folder: Path) -> list[list[int]]:
        if folder not in cache:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            cache[folder] = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
        return cache[folder]

    return get


@pytest.fixture(scope="module")
def reference(texts):
    """`reference(folder)`: sentence-transformers' normalised embeddings of `texts`, computed once."""
    from sentence_transformers import SentenceTransformer

    cache: dict[Path, np.ndarray] = {}

    def get(folder: Path) -> np.ndarray:
        if folder not in cache:
            st = SentenceTransformer(str(folder), device="cpu")
            cache[folder] = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return cache[folder]

    return get


# --- parity with sentence-transformers ---------------------------------------------------------------


@pytest.mark.parametrize(("family", "pooling"), FAMILY_POOLINGS)
def test_family_matches_sentence_transformers_batched_and_one_at_a_time(
    tiny, reference, tokens_of, family, pooling
):
    folder = tiny(family, pooling)
    runner = make_runner(folder)
    assert runner.pooler.mode == pooling
    tokens = tokens_of(folder)
    assert max(map(len, tokens)) == 256
    batched = embed(runner, tokens)
    singles = np.concatenate([embed(runner, [t]) for t in tokens])
    assert cosine(batched, reference(folder)).min() >= 0.9999
    assert cosine(singles, reference(folder)).min() >= 0.9999
    np.testing.assert_allclose(singles, batched, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_causal_lm_checkpoint_loads_like_the_bare_model(tiny, reference, tokens_of, tmp_path, family):
    folder, tokens = tiny(family), tokens_of(tiny(family))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" in names and all(n.startswith(("model.", "lm_head.")) for n in names)
    bare = bare_copy(folder, tmp_path / "bare", FAMILIES[family][0].replace("ForCausalLM", "Model"))
    from_bare = embed(make_runner(bare), tokens)
    np.testing.assert_allclose(from_bare, embed(make_runner(folder), tokens), atol=1e-6)
    assert cosine(from_bare, reference(folder)).min() >= 0.9999


def test_decoder_in_bfloat16_stays_close_to_the_float32_reference(tiny, reference, tokens_of):
    folder = tiny("qwen2")
    runner = make_runner(folder, dtype="bfloat16")
    assert runner.torch_dtype == torch.bfloat16
    assert cosine(embed(runner, tokens_of(folder)), reference(folder)).min() >= 0.999


def test_load_is_logged_with_the_config_architecture(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="embedserve.gpu_proc.model_runner"):
        make_runner(tiny("qwen2"))
    assert any(
        re.fullmatch(
            r"Load weight end\. type=Qwen2ForCausalLM, dtype=torch\.float32, mem usage=\d+\.\d\d GB\.", m
        )
        for m in caplog.messages
    )


def test_a_sliding_window_shorter_than_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match="sliding window of 256 tokens"):
        make_runner(tiny("mistral"), context_length=300)


# --- the KV pool: prefix reuse and chunked prefill ---------------------------------------------------


class Pool:
    """Hands out scattered pool slots, as a page allocator that has served other requests would."""

    def __init__(self, size: int, seed: int = 0):
        self.free = list(np.random.default_rng(seed).permutation(size).astype(np.int32))

    def take(self, n: int) -> np.ndarray:
        taken, self.free = self.free[:n], self.free[n:]
        return np.asarray(taken, dtype=np.int32)


def extend(
    runner: ModelRunner, seqs: list[list[int]], cached: list[np.ndarray], pool: Pool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One KV batch: seqs[b] are new tokens after the prefix whose slots are cached[b].

    Returns the rows and every sequence's slots after this batch.
    """
    new = [pool.take(len(s)) for s in seqs]
    kv = KvBatch(
        prefix_lens=np.array([len(c) for c in cached], dtype=np.int32),
        prefix_slots=np.concatenate([*cached, np.zeros(0, np.int32)]),
        new_slots=np.concatenate(new),
    )
    rows = runner.embed(np.concatenate([np.asarray(s, np.int32) for s in seqs]), [len(s) for s in seqs], kv)
    return rows, [np.concatenate([c, n]) for c, n in zip(cached, new, strict=True)]


def empty() -> np.ndarray:
    return np.zeros(0, np.int32)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def kv_runner(request, tiny) -> ModelRunner:
    runner = make_runner(tiny(request.param))
    runner.allocate_kv_pool(4096)
    return runner


@pytest.fixture(scope="module")
def long_tokens(kv_runner, tokens_of) -> list[list[int]]:
    """Four sequences of 40+ tokens, in the kv_runner's tokenisation."""
    return sorted((t for t in tokens_of(Path(kv_runner.config.path)) if len(t) >= 40), key=len)[-4:]


def test_prefix_then_extension_equals_the_whole_sequence(kv_runner, long_tokens):
    seq, pool = long_tokens[-1], Pool(4096, seed=1)
    whole = embed(kv_runner, [seq])
    _, (slots,) = extend(kv_runner, [seq[:100]], [empty()], pool)
    row, _ = extend(kv_runner, [seq[100:]], [slots], pool)
    assert cosine(row, whole)[0] >= 0.99999


def test_three_chunks_equal_the_whole_sequence(kv_runner, long_tokens):
    seq, pool = long_tokens[-1], Pool(4096, seed=2)
    whole = embed(kv_runner, [seq])
    slots = empty()
    for start, end in ((0, 70), (70, 71), (71, len(seq))):
        row, (slots,) = extend(kv_runner, [seq[start:end]], [slots], pool)
    assert cosine(row, whole)[0] >= 0.99999


def test_a_batch_mixing_prefix_lengths_equals_each_whole_sequence(kv_runner, long_tokens):
    """Sequence b has its first prefix_lens[b] tokens cached (0 for one); the rest run in one batch."""
    pool = Pool(4096, seed=3)
    prefix_lens = [0, 1, 37, len(long_tokens[3]) - 1]
    prefixes = [s[:p] for s, p in zip(long_tokens[1:], prefix_lens[1:], strict=True)]
    _, cached = extend(kv_runner, prefixes, [empty()] * 3, pool)
    rests = [s[p:] for s, p in zip(long_tokens, prefix_lens, strict=True)]
    rows, _ = extend(kv_runner, rests, [empty(), *cached], pool)
    assert cosine(rows, embed(kv_runner, long_tokens)).min() >= 0.99999


def test_kv_pool_is_sized_and_logged(tiny, caplog):
    runner = make_runner(tiny("qwen2"))
    assert runner.supports_kv_cache
    # 2 layers x (K + V) x 2 kv heads x head_dim 16 x 4 bytes
    assert runner.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    with caplog.at_level(logging.INFO, logger="embedserve.gpu_proc.model_runner"):
        runner.allocate_kv_pool(1 << 20)
    assert "KV Cache is allocated. #tokens: 1048576, K size: 0.25 GB, V size: 0.25 GB" in caplog.messages


@pytest.mark.parametrize(("family", "pooling"), [("bert", "cls"), ("qwen2", "mean")])
def test_kv_batch_is_refused_where_a_prefix_cannot_be_reused(tiny, family, pooling):
    runner = make_runner(tiny(family, pooling))
    assert not runner.supports_kv_cache
    kv = KvBatch(np.zeros(1, np.int32), empty(), np.arange(3, dtype=np.int32))
    with pytest.raises(ValueError, match="supports_kv_cache is False"):
        runner.embed(np.array([101, 7, 102], np.int32), [3], kv)


def test_kv_batch_with_slots_outside_the_pool_is_refused(tiny):
    runner = make_runner(tiny("qwen2"))
    runner.allocate_kv_pool(8)
    kv = KvBatch(np.zeros(1, np.int32), empty(), np.array([0, 1, 8], np.int32))
    with pytest.raises(ValueError, match=r"within 0\.\.7"):
        runner.embed(np.array([101, 7, 102], np.int32), [3], kv)


# --- CUDA: every family in half precision against the float32 reference -----------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(("family", "pooling"), FAMILY_POOLINGS)
def test_family_on_cuda_in_half_precision(tiny, reference, tokens_of, family, pooling, dtype):
    folder = tiny(family, pooling)
    runner = make_runner(folder, dtype=dtype, device="cuda")
    assert cosine(embed(runner, tokens_of(folder)), reference(folder)).min() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_chunks_on_cuda_equal_the_float32_reference(tiny, reference, tokens_of, dtype):
    """The Triton extend-attention path: each text in chunks of 50 over a scattered pool."""
    folder = tiny("qwen2")
    tokens = tokens_of(folder)
    runner = make_runner(folder, dtype=dtype, device="cuda")
    runner.allocate_kv_pool(8192)
    pool, slots, finished = Pool(8192, seed=4), [empty() for _ in tokens], {}
    for start in range(0, max(map(len, tokens)), 50):
        live = [i for i, t in enumerate(tokens) if len(t) > start]
        rows, after = extend(
            runner, [tokens[i][start : start + 50] for i in live], [slots[i] for i in live], pool
        )
        for row, i, s in zip(rows, live, after, strict=True):
            slots[i] = s
            if len(tokens[i]) <= start + 50:  # its last chunk: the row is the sequence's embedding
                finished[i] = row
    assert cosine(np.stack([finished[i] for i in range(len(tokens))]), reference(folder)).min() >= 0.999
