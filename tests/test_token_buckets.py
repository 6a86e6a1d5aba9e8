"""CPU batches run at a rounded-up token count (gpu_proc/token_buckets.py): few sizes, little padding,
and the dummy tokens never reach a real sequence's embedding (checked against transformers' BertModel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model
from transformers import BertModel

from embedserve.gpu_proc.model_runner import ModelRunner
from embedserve.gpu_proc.token_buckets import pad_batch, padded_token_count
from embedserve.model_config import load_model_config


def test_a_4096_token_budget_meets_144_sizes_none_padded_by_a_sixteenth():
    sizes = {padded_token_count(n) for n in range(1, 4097)}
    assert len(sizes) == 144  # x 4 linear shapes: within oneDNN's 1,024-entry primitive cache
    for n in range(1, 5000):
        padded = padded_token_count(n)
        assert padded == n if n < 32 else n <= padded < n * 17 / 16
        assert padded_token_count(padded) == padded  # a size is its own bucket


def test_pad_batch_appends_one_dummy_sequence_at_position_zero():
    """65 tokens run as 68 (a multiple of 4, 1/16 of 64)."""
    ids = np.arange(1, 66, dtype=np.int32)
    lens = np.array([5, 60])
    positions = np.concatenate([np.arange(5), np.arange(60)])
    got_ids, got_lens, got_positions = pad_batch(ids, lens, positions)
    assert got_lens.tolist() == [5, 60, 3]
    np.testing.assert_array_equal(got_ids[:65], ids)
    assert got_ids.dtype == ids.dtype and not got_ids[65:].any()
    np.testing.assert_array_equal(got_positions[:65], positions)
    assert not got_positions[65:].any()


def test_a_long_pad_comes_as_several_short_dummy_sequences():
    """4,100 tokens run as 4,352: 252 dummies in sequences of at most 64 tokens."""
    lens = np.array([4000, 100])
    ids, got_lens, positions = pad_batch(np.ones(4100, np.int32), lens, np.zeros(4100, np.int64))
    assert len(ids) == len(positions) == padded_token_count(4100) == 4352
    assert got_lens.tolist() == [4000, 100, 64, 64, 64, 60]


@pytest.mark.parametrize("tokens", [1, 10, 31, 32, 200])
def test_a_batch_already_at_a_size_is_left_alone(tokens):
    """Under 32 tokens every count is a size: a short query runs without dummies."""
    ids, lens, positions = np.ones(tokens, np.int64), np.array([tokens]), np.arange(tokens)
    assert pad_batch(ids, lens, positions)[0] is ids


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, bundled_model_path):
    return build_tiny_model(tmp_path_factory.mktemp("bert_mean"), "bert", bundled_model_path, "mean")


def test_dummy_tokens_never_reach_a_real_embedding(tiny_bert):
    """27 sequences of 38 tokens: 1,026 tokens run as 1,088, a dummy of 62 tokens, longer than the
    40-token context; every row still equals transformers' BertModel on that sequence alone, and
    only the real rows come back."""
    runner = ModelRunner(load_model_config(str(tiny_bert), context_length=40), device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1000, 20000, size=38) for _ in range(27)]
    assert padded_token_count(27 * 38) - 27 * 38 > 40
    got = runner.embed(np.concatenate(seqs), [38] * 27)

    bert = BertModel.from_pretrained(str(tiny_bert)).eval()
    with torch.no_grad():
        hidden = bert(torch.from_numpy(np.stack(seqs))).last_hidden_state.mean(dim=1)
    want = torch.nn.functional.normalize(hidden, dim=-1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5)
