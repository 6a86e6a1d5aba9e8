"""A small CPU batch after a pause runs on one thread, every other batch on all of the executor's
(gpu_proc/cpu_threads.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from embedserve.gpu_proc import cpu_threads
from embedserve.gpu_proc.cpu_threads import SERIAL_LAYER_FLOPS, WARM_GAP_S, CoreShare, batch_threads
from embedserve.gpu_proc.model_runner import ModelRunner
from embedserve.model_config import load_model_config

MINILM_LAYER_FLOPS = 2 * (4 * 384 * 384 + 2 * 384 * 1536)  # per token: q, k, v, out; two MLP linears


IDLE = 1.0  # seconds since the last forward: the threads have gone cold


def test_small_batches_after_a_pause_get_one_thread_the_rest_all():
    assert batch_threads(10, MINILM_LAYER_FLOPS, 2, IDLE) == 1
    assert batch_threads(10, MINILM_LAYER_FLOPS, 2, WARM_GAP_S / 2) == 2  # back to back: still warm
    assert batch_threads(64, MINILM_LAYER_FLOPS, 2, IDLE) == 2
    # a 1.5B-parameter model's layer holds ~47M weights: even one token is worth sharing
    assert batch_threads(4, 2 * 47e6, 16, IDLE) == 16
    edge = int(SERIAL_LAYER_FLOPS // MINILM_LAYER_FLOPS)
    assert batch_threads(edge, MINILM_LAYER_FLOPS, 2, IDLE) == 1
    assert batch_threads(edge + 1, MINILM_LAYER_FLOPS, 2, IDLE) == 2


def test_a_running_batch_restores_the_thread_count_even_on_error():
    before = torch.get_num_threads()
    share = CoreShare(max_threads=2)
    with pytest.raises(RuntimeError), share.running_batch(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before and share.running == 0


def test_two_batches_split_the_threads_and_one_alone_takes_them_back():
    share = CoreShare(max_threads=4)
    seen = {}
    first_alone, second_started, first_checked, second_done = (threading.Event() for _ in range(4))

    def first() -> None:
        with share.running_batch(4):
            seen["alone"] = torch.get_num_threads()
            first_alone.set()
            second_started.wait(10)
            share.rebalance()  # the next layer, with the other batch running
            seen["beside"] = torch.get_num_threads()
            first_checked.set()
            second_done.wait(10)
            share.rebalance()  # alone again
            seen["alone again"] = torch.get_num_threads()

    def second() -> None:
        with share.running_batch(4):
            second_started.set()
            seen["second"] = torch.get_num_threads()
            first_checked.wait(10)
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    first_alone.wait(10)
    threads[1].start()
    for t in threads:
        t.join(10)
    assert seen == {"alone": 4, "beside": 2, "second": 2, "alone again": 4}
    # a small batch's own ceiling holds even alone
    with share.running_batch(1):
        share.rebalance()
        assert torch.get_num_threads() == 1


@pytest.fixture(scope="module")
def runner(bundled_model_path):
    before = torch.get_num_threads()
    yield ModelRunner(load_model_config(str(bundled_model_path)), "cpu", "float32", num_threads=2)
    torch.set_num_threads(before)


def test_the_runner_picks_threads_per_batch_and_embeds_the_same(runner, monkeypatch):
    assert runner.flops_per_token_per_layer == MINILM_LAYER_FLOPS  # read from the packed layers' shapes
    seen = []
    hook = runner.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        ids = np.random.default_rng(0).integers(1000, 20000, 200).astype(np.int32)
        runner.last_forward_end = 0.0  # as after a long idle
        short = runner.embed(ids[:10], [10])
        long = runner.embed(ids, [10, 190])
        # right after a forward: threads still warm (the window widened so a slow CI machine's
        # stall between two lines cannot make this call "after a pause")
        monkeypatch.setattr(cpu_threads, "WARM_GAP_S", 60.0)
        runner.embed(ids[:10], [10])
    finally:
        hook.remove()
    assert seen == [1, 2, 2]
    assert torch.get_num_threads() == 2
    # the 10-token sequence embeds the same alone (one thread) and in a batch (two threads)
    assert np.allclose(short[0], long[0], atol=1e-5)
