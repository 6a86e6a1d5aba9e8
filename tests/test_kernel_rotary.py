"""Rotary embedding in place: the reference against HF-style float64 math, Triton against the reference.

Triton runs in its interpreter on CPU tensors here (TRITON_INTERPRET=1); the `gpu` tests run compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # NOTE: before the kernels' jit module is imported: triton picks interpreted-or-compiled when it
    # decorates a kernel. Never on a CUDA machine, where the `gpu` tests must run compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from embedserve.kernels import apply_rotary_torch_, apply_rotary_triton_, rotary_cos_sin_cache
from embedserve.kernels.runtime import interpreting

# NOTE: the interpreter rounds float32 -> bf16 by truncation where GPUs round to nearest: one bf16 ulp.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


@pytest.fixture
def interpreted_triton():
    pytest.importorskip("triton", reason="triton is not installed: pip install triton")
    if not interpreting():
        pytest.skip("CPU-tensor kernel tests need TRITON_INTERPRET=1 (unset on CUDA machines)")


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def rotate_half(x):
    """HF Llama/Qwen's helper, verbatim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def naive_rotary(x, positions, rotary_dim, base, is_neox):
    """float64; neox as HF's `q * cos + rotate_half(q) * sin`, GPT-J one lane pair at a time."""
    x = x.double().clone()
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = positions.double()[:, None] * inv_freq[None, :]  # [T, r/2]
    if is_neox:
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        rot = x[..., :rotary_dim].clone()
        x[..., :rotary_dim] = rot * emb.cos() + rotate_half(rot) * emb.sin()
        return x
    for i in range(rotary_dim // 2):
        cos, sin = freqs[:, i, None].cos(), freqs[:, i, None].sin()
        a, b = x[..., 2 * i].clone(), x[..., 2 * i + 1].clone()
        x[..., 2 * i], x[..., 2 * i + 1] = a * cos - b * sin, b * cos + a * sin
    return x


CASES = {  # (heads, kv heads, head_dim, rotary_dim, is_neox)
    "neox_gqa": (4, 2, 16, 16, True),
    "neox_partial": (3, 1, 24, 8, True),
    "gptj": (2, 2, 16, 16, False),
    "gptj_partial": (4, 2, 20, 12, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch_rotary_kernel_reference_matches_hf(case):
    heads, kv_heads, head_dim, rotary_dim, is_neox = case
    q, k = rand(11, heads, head_dim), rand(11, kv_heads, head_dim, seed=1)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 7, 150, 5, 6, 199])  # packed sequences restart at 0
    want_q, want_k = (
        naive_rotary(q, positions, rotary_dim, 10000.0, is_neox),
        naive_rotary(k, positions, rotary_dim, 10000.0, is_neox),
    )
    cache = rotary_cos_sin_cache(200, rotary_dim, 10000.0)
    got_q, got_k = apply_rotary_torch_(q, k, positions, cache, is_neox)
    assert got_q is q and got_k is k  # in place
    torch.testing.assert_close(q.double(), want_q, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), want_k, atol=5e-5, rtol=1e-5)


def test_torch_rotary_kernel_reference_builds_cache_from_base():
    q, k, positions = rand(6, 2, 16), rand(6, 1, 16, seed=1), torch.tensor([4, 0, 9, 2, 2, 31])
    q2, k2 = q.clone(), k.clone()
    apply_rotary_torch_(q, k, positions, (500000.0, 16))
    apply_rotary_torch_(q2, k2, positions, rotary_cos_sin_cache(32, 16, 500000.0))
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_rotary_kernel_matches_reference(interpreted_triton, case, dtype):
    heads, kv_heads, head_dim, rotary_dim, is_neox = case
    q, k = rand(9, heads, head_dim, dtype=dtype), rand(9, kv_heads, head_dim, dtype=dtype, seed=1)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 63], dtype=torch.int32)
    cache = rotary_cos_sin_cache(64, rotary_dim)
    want_q, want_k = apply_rotary_torch_(q.clone(), k.clone(), positions, cache, is_neox)
    apply_rotary_triton_(q, k, positions, cache, is_neox)
    torch.testing.assert_close(q, want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, want_k, **TOLERANCE[dtype])


def test_triton_rotary_kernel_writes_through_qkv_views(interpreted_triton):
    """q and k as slices of one fused qkv projection: the rotation lands in the parent, v stays as it was."""
    qkv = rand(7, 4 + 2 + 2, 16)
    positions = torch.arange(7)
    want_q, want_k = apply_rotary_torch_(qkv[:, :4].clone(), qkv[:, 4:6].clone(), positions, (10000.0, 16))
    v_before = qkv[:, 6:].clone()
    apply_rotary_triton_(qkv[:, :4], qkv[:, 4:6], positions, (10000.0, 16))
    torch.testing.assert_close(qkv[:, :4], want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv[:, 4:6], want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, 6:], v_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_triton_rotary_kernel_on_cuda(dtype, is_neox):
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 would run the CUDA test in the interpreter; unset it")
    q, k = (
        rand(2048, 12, 128, dtype=dtype, device="cuda"),
        rand(2048, 2, 128, dtype=dtype, device="cuda", seed=1),
    )
    positions = torch.randint(0, 32768, (2048,), generator=torch.Generator().manual_seed(2)).cuda()
    cache = rotary_cos_sin_cache(32768, 128, 1000000.0, device="cuda")
    want_q, want_k = apply_rotary_torch_(q.clone(), k.clone(), positions, cache, is_neox)
    apply_rotary_triton_(q, k, positions, cache, is_neox)
    torch.testing.assert_close(q, want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, want_k, **TOLERANCE[dtype])
