"""The attention backends against the torch backend, through the model runner.

CPU (CI): the Triton backend runs its kernel in the interpreter (TRITON_INTERPRET=1, set by conftest)
on tiny models, a grouped-query decoder (qwen2, causal) and BERT (bidirectional), for fresh and
KV-pool batches. FlashInfer has no CPU kernels: its planning (host indptrs, page-size-1 kv indices, the
causal flag, one plan per batch) runs against a stand-in that computes FlashInfer's documented
semantics in torch. `gpu` tests run both backends in float16/bfloat16 on CUDA.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, build_tiny_model

from embedserve.gpu_proc.layers import attention_triton
from embedserve.gpu_proc.layers.attention import (
    AttentionBackendUnavailable,
    TorchAttention,
    get_attention_backend,
)
from embedserve.gpu_proc.layers.attention_flashinfer import FlashInferAttention, kv_indices
from embedserve.gpu_proc.layers.attention_triton import TritonAttention
from embedserve.gpu_proc.model_runner import KvBatch, ModelRunner
from embedserve.kernels.runtime import interpreting
from embedserve.model_config import load_model_config

# head_dim 128 (gte-Qwen2's): a size FlashInfer's kernels are built for; the tiny models' 16 is not.
WIDE_FAMILIES = {
    "qwen2_hd128": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(
            FAMILIES["qwen2"][2], hidden_size=256, num_attention_heads=4, head_dim=128, intermediate_size=256
        ),
    ),
    "bert_hd128": (
        "BertModel",
        "BertConfig",
        dict(FAMILIES["bert"][2], hidden_size=256, num_attention_heads=2, intermediate_size=256),
    ),
}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def make_runner(folder: Path, backend: str, device: str = "cpu", dtype: str = "float32") -> ModelRunner:
    return ModelRunner(load_model_config(str(folder)), device=device, dtype=dtype, attention_backend=backend)


def random_seqs(lens: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 30000, n).astype(np.int32) for n in lens]


def embed(runner: ModelRunner, seqs: list[np.ndarray]) -> np.ndarray:
    return runner.embed(np.concatenate(seqs), [len(s) for s in seqs])


class Pool:
    """Scattered pool slots, as a page allocator that has served other requests hands them out."""

    def __init__(self, size: int, seed: int = 0):
        self.free = np.random.default_rng(seed).permutation(size).astype(np.int32)

    def take(self, n: int) -> np.ndarray:
        taken, self.free = self.free[:n], self.free[n:]
        return taken


def extend(runner: ModelRunner, news: list[np.ndarray], cached: list[np.ndarray], pool: Pool):
    """One KV batch: news[b] follow the prefix cached at slots cached[b]; returns rows and new slots."""
    slots = [pool.take(len(n)) for n in news]
    kv = KvBatch(
        prefix_lens=np.array([len(c) for c in cached], np.int32),
        prefix_slots=np.concatenate([*cached, np.zeros(0, np.int32)]),
        new_slots=np.concatenate(slots),
    )
    rows = runner.embed(np.concatenate(news), [len(n) for n in news], kv)
    return rows, [np.concatenate([c, s]) for c, s in zip(cached, slots, strict=True)]


def prefix_then_rest(runner: ModelRunner, seqs: list[np.ndarray], cuts: list[int], pool: Pool) -> np.ndarray:
    """Caches seqs[b][:cuts[b]] in one batch (cut 0: nothing), then runs every rest in a second one."""
    cached = [np.zeros(0, np.int32)] * len(seqs)
    firsts = [i for i, c in enumerate(cuts) if c > 0]
    _, after = extend(runner, [seqs[i][: cuts[i]] for i in firsts], [cached[i] for i in firsts], pool)
    for i, slots in zip(firsts, after, strict=True):
        cached[i] = slots
    rows, _ = extend(runner, [s[c:] for s, c in zip(seqs, cuts, strict=True)], cached, pool)
    return rows


def in_chunks(runner: ModelRunner, seqs: list[np.ndarray], chunk: int, pool: Pool) -> np.ndarray:
    """Every sequence through the pool `chunk` tokens at a time, all live sequences in each batch."""
    slots, finished = [np.zeros(0, np.int32) for _ in seqs], {}
    for start in range(0, max(map(len, seqs)), chunk):
        live = [i for i, s in enumerate(seqs) if len(s) > start]
        rows, after = extend(
            runner, [seqs[i][start : start + chunk] for i in live], [slots[i] for i in live], pool
        )
        for row, i, s in zip(rows, live, after, strict=True):
            slots[i] = s
            finished[i] = row  # the last chunk's row is the sequence's embedding
    return np.stack([finished[i] for i in range(len(seqs))])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path):
    """`tiny(family, pooling) -> folder`, built once per module; `*_hd128` families are the wide ones."""
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, pooling: str = "last") -> Path:
        if (family, pooling) not in built:
            with pytest.MonkeyPatch.context() as mp:
                for name, spec in WIDE_FAMILIES.items():
                    mp.setitem(FAMILIES, name, spec)
                folder = tmp_path_factory.mktemp(f"{family}_{pooling}")
                built[family, pooling] = build_tiny_model(folder, family, bundled_model_path, pooling)
        return built[family, pooling]

    return get


@pytest.fixture
def interpreted_triton():
    pytest.importorskip("triton", reason="triton is not installed: pip install triton")
    if not interpreting():
        pytest.skip("CPU-tensor kernel tests need TRITON_INTERPRET=1 (unset on CUDA machines)")


@pytest.fixture
def triton_launches(monkeypatch) -> list[int]:
    """Counts the backend's kernel launches: proof that the kernel ran, not a fallback."""
    launches: list[int] = []
    kernel = attention_triton.extend_attention_triton

    def counted(*args, **kwargs):
        launches.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention_triton, "extend_attention_triton", counted)
    return launches


# --- Triton under the interpreter (CPU) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "pooling"), [("qwen2", "last"), ("bert", "mean")], ids=["causal_gqa", "bidirectional"]
)
def test_triton_backend_matches_torch_on_fresh_batches(
    tiny, interpreted_triton, triton_launches, family, pooling
):
    folder, seqs = tiny(family, pooling), random_seqs([5, 17, 33, 1])
    runner = make_runner(folder, "triton")
    assert isinstance(runner.attention_backend, TritonAttention)
    got = embed(runner, seqs)
    assert len(triton_launches) == len(runner.attention_layers)
    np.testing.assert_allclose(got, embed(make_runner(folder, "torch"), seqs), atol=2e-5)


def test_triton_backend_matches_torch_over_the_kv_pool(tiny, interpreted_triton, triton_launches):
    """Cached prefixes of mixed lengths (0, 1, 12), then one sequence in chunks: rows equal the whole sequence's."""
    folder, seqs = tiny("qwen2"), random_seqs([30, 21, 9], seed=1)
    whole = embed(make_runner(folder, "torch"), seqs)
    runner = make_runner(folder, "triton")
    runner.allocate_kv_pool(256)
    mixed = prefix_then_rest(runner, seqs, [12, 1, 0], Pool(256, seed=2))
    chunked = in_chunks(runner, seqs[:1], 11, Pool(256, seed=3))
    assert len(triton_launches) == len(runner.attention_layers) * (2 + 3)
    np.testing.assert_allclose(mixed, whole, atol=2e-5)
    np.testing.assert_allclose(chunked, whole[:1], atol=2e-5)


# --- choosing a backend ----------------------------------------------------------------------------------


def test_auto_picks_the_cpu_kernel_on_cpu(tiny, caplog):
    assert get_attention_backend("auto", "cpu").name == "cpu"
    with caplog.at_level(logging.INFO, logger="embedserve.gpu_proc.model_runner"):
        runner = make_runner(tiny("qwen2"), "auto")
    assert runner.attention_backend.name == "cpu"
    assert "Attention backend: cpu" in caplog.messages


def test_torch_backend_is_still_chosen_by_name(tiny):
    assert isinstance(make_runner(tiny("qwen2"), "torch").attention_backend, TorchAttention)


def test_flashinfer_on_cpu_is_refused_with_a_clear_message(tiny):
    with pytest.raises(
        AttentionBackendUnavailable, match="'flashinfer' cannot run here: FlashInfer needs a CUDA device"
    ):
        make_runner(tiny("qwen2"), "flashinfer")


def test_triton_on_cpu_is_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(AttentionBackendUnavailable, match="'triton' cannot run here"):
        get_attention_backend("triton", "cpu")


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        get_attention_backend("xformers", "cpu")


# --- FlashInfer's planning, against a stand-in (CPU) ----------------------------------------------------


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """FlashInfer's semantics in float64: [n, H, D] queries over [m, Hkv, D] keys; causal: query i
    sees keys 0 .. m - n + i (the mask is aligned to the last key)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal:
        n, m = q.shape[0], k.shape[0]
        hidden = torch.arange(m)[None, :] > (m - n + torch.arange(n))[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


class FakeRaggedWrapper:
    def __init__(self, workspace: torch.Tensor, kv_layout: str):
        assert kv_layout == "NHD" and workspace.numel() == 128 << 20
        self.plans: list[dict] = []
        self.runs = 0

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, **kw):
        assert qo_indptr.device.type == "cpu" and qo_indptr.dtype == torch.int32
        assert torch.equal(qo_indptr, kv_indptr)
        self.plans.append(dict(qo=qo_indptr.tolist(), heads=(num_qo_heads, num_kv_heads, head_dim), **kw))

    def run(self, q, k, v):
        self.runs += 1
        p = self.plans[-1]
        assert (q.shape[1], k.shape[1], q.shape[2]) == p["heads"] and q.dtype == p["q_data_type"]
        out = torch.empty_like(q)
        for s, e in zip(p["qo"], p["qo"][1:], strict=False):
            out[s:e] = attend(q[s:e], k[s:e], v[s:e], p["causal"], p["sm_scale"])
        return out


class FakePagedWrapper(FakeRaggedWrapper):
    def plan(
        self,
        qo_indptr,
        kv_indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        **kw,
    ):
        assert page_size == 1 and (last_page_len == 1).all() and indices.dtype == torch.int32
        self.plans.append(
            dict(
                qo=qo_indptr.tolist(),
                kv=kv_indptr.tolist(),
                rows=indices.tolist(),
                heads=(num_qo_heads, num_kv_heads, head_dim),
                **kw,
            )
        )

    def run(self, q, paged_kv_cache):
        self.runs += 1
        p = self.plans[-1]
        k_cache, v_cache = paged_kv_cache
        assert k_cache.dim() == 4 and k_cache.shape[1] == 1  # [pages, page_size 1, Hkv, D]: NHD
        out = torch.empty_like(q)
        for b, (s, e) in enumerate(zip(p["qo"], p["qo"][1:], strict=False)):
            rows = p["rows"][p["kv"][b] : p["kv"][b + 1]]
            out[s:e] = attend(q[s:e], k_cache[rows, 0], v_cache[rows, 0], p["causal"], p["sm_scale"])
        return out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.ModuleType("flashinfer")
    module.BatchPrefillWithRaggedKVCacheWrapper = FakeRaggedWrapper  # type: ignore[attr-defined]
    module.BatchPrefillWithPagedKVCacheWrapper = FakePagedWrapper  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", module)


def with_flashinfer_on_cpu(runner: ModelRunner) -> FlashInferAttention:
    """NOTE: by hand: `get_attention_backend` rightly refuses FlashInfer on a CPU runner."""
    backend = FlashInferAttention("cpu")
    backend.configure(runner.attention_layers, runner.torch_dtype)
    runner.attention_backend = backend
    return backend


def test_flashinfer_kv_indices_are_each_prefix_then_its_new_slots():
    got = kv_indices(
        np.array([2, 0, 1]), np.array([10, 11, 12]), np.array([1, 2, 2]), np.array([20, 21, 22, 23, 24])
    )
    assert got.tolist() == [10, 11, 20, 21, 22, 12, 23, 24]


@pytest.mark.parametrize(("family", "pooling"), [("qwen2_hd128", "last"), ("bert_hd128", "mean")])
def test_flashinfer_backend_plans_once_per_batch_and_matches_torch(tiny, fake_flashinfer, family, pooling):
    # NOTE: 64 tokens, a size a CPU batch runs at as it is (no dummy sequence: gpu_proc/token_buckets.py)
    folder, seqs = tiny(family, pooling), random_seqs([5, 17, 33, 9])
    want = embed(make_runner(folder, "torch", dtype="bfloat16"), seqs)
    runner = make_runner(folder, "torch", dtype="bfloat16")
    backend = with_flashinfer_on_cpu(runner)
    warm_up_plans = len(backend.ragged.plans)
    got = embed(runner, seqs)
    assert len(backend.ragged.plans) == warm_up_plans + 1
    assert backend.ragged.plans[-1]["causal"] == (family == "qwen2_hd128")
    assert backend.ragged.plans[-1]["qo"] == [0, 5, 22, 55, 64]
    assert backend.ragged.runs == 1 + len(runner.attention_layers)
    assert cosine(got, want).min() >= 0.9999


def test_flashinfer_backend_over_the_kv_pool_matches_the_whole_sequence(tiny, fake_flashinfer):
    folder, seqs = tiny("qwen2_hd128"), random_seqs([30, 21, 9], seed=1)
    whole = embed(make_runner(folder, "torch", dtype="bfloat16"), seqs)
    runner = make_runner(folder, "torch", dtype="bfloat16")
    runner.allocate_kv_pool(256)
    backend = with_flashinfer_on_cpu(runner)
    mixed = prefix_then_rest(runner, seqs, [12, 1, 0], Pool(256, seed=2))
    assert backend.paged.plans[-1]["kv"] == [0, 30, 51, 60] and backend.paged.plans[-1]["causal"]
    chunked = in_chunks(runner, seqs[:1], 11, Pool(256, seed=3))
    assert cosine(mixed, whole).min() >= 0.9999
    assert cosine(chunked, whole[:1]).min() >= 0.9999


# --- CUDA: both backends against the torch backend in half precision --------------------------------------

MIXED_LENS = [1, 7, 64, 129, 256, 200, 33, 2]


def skip_unless_runnable(backend: str, dtype: str) -> None:
    cls = {"triton": TritonAttention, "flashinfer": FlashInferAttention}[backend]
    reason = cls.unavailable(torch.device("cuda"), getattr(torch, dtype))
    if reason:
        pytest.skip(reason)
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 would run the CUDA test in the interpreter; unset it")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
@pytest.mark.parametrize(("family", "pooling"), [("qwen2_hd128", "last"), ("bert_hd128", "mean")])
def test_gpu_backend_matches_torch_on_fresh_batches(tiny, backend, dtype, family, pooling):
    skip_unless_runnable(backend, dtype)
    folder, seqs = tiny(family, pooling), random_seqs(MIXED_LENS)
    runner = make_runner(folder, backend, "cuda", dtype)
    assert runner.attention_backend.name == backend
    want = embed(make_runner(folder, "torch", "cuda", dtype), seqs)
    assert cosine(embed(runner, seqs), want).min() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_gpu_backend_over_the_kv_pool_matches_torch(tiny, backend, dtype):
    """Prefixes of mixed lengths (0, 1, 37, all but one token) and chunks of 50 over a scattered pool."""
    skip_unless_runnable(backend, dtype)
    folder, seqs = tiny("qwen2_hd128"), random_seqs(MIXED_LENS[2:6], seed=4)
    whole = embed(make_runner(folder, "torch", "cuda", dtype), seqs)
    runner = make_runner(folder, backend, "cuda", dtype)
    runner.allocate_kv_pool(4096)
    cuts = [0, 1, 37, len(seqs[3]) - 1]
    assert cosine(prefix_then_rest(runner, seqs, cuts, Pool(4096, seed=5)), whole).min() >= 0.999
    assert cosine(in_chunks(runner, seqs, 50, Pool(4096, seed=6)), whole).min() >= 0.999
