"""Small CPU batches run on one thread, the rest on all of the executor's (gpu_proc/cpu_threads.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedserve.gpu_proc.cpu_threads import SERIAL_LAYER_FLOPS, batch_threads, torch_threads
from embedserve.gpu_proc.model_runner import ModelRunner
from embedserve.model_config import load_model_config

MINILM_LAYER_FLOPS = 2 * (4 * 384 * 384 + 2 * 384 * 1536)  # per token: q, k, v, out; two MLP linears


def test_small_batches_get_one_thread_large_ones_all():
    assert batch_threads(10, MINILM_LAYER_FLOPS, 2) == 1
    assert batch_threads(64, MINILM_LAYER_FLOPS, 2) == 2
    # a 1.5B-parameter model's layer holds ~47M weights: even one token is worth sharing
    assert batch_threads(4, 2 * 47e6, 16) == 16
    edge = int(SERIAL_LAYER_FLOPS // MINILM_LAYER_FLOPS)
    assert batch_threads(edge, MINILM_LAYER_FLOPS, 2) == 1
    assert batch_threads(edge + 1, MINILM_LAYER_FLOPS, 2) == 2


def test_torch_threads_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def runner(bundled_model_path):
    before = torch.get_num_threads()
    yield ModelRunner(load_model_config(str(bundled_model_path)), "cpu", "float32", num_threads=2)
    torch.set_num_threads(before)


def test_the_runner_picks_threads_per_batch_and_embeds_the_same(runner):
    assert runner.flops_per_token_per_layer == MINILM_LAYER_FLOPS  # read from the packed layers' shapes
    seen = []
    hook = runner.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        ids = np.random.default_rng(0).integers(1000, 20000, 200).astype(np.int32)
        short = runner.embed(ids[:10], [10])
        long = runner.embed(ids, [10, 190])
    finally:
        hook.remove()
    assert seen == [1, 2]
    assert torch.get_num_threads() == 2
    # the 10-token sequence embeds the same alone (one thread) and in a batch (two threads)
    assert np.allclose(short[0], long[0], atol=1e-5)
