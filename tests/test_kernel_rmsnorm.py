"""RMSNorm and its fused residual add: the reference against plain float64 math, Triton against the reference.

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

from embedserve.kernels import (
    fused_add_rmsnorm_torch,
    fused_add_rmsnorm_triton,
    rmsnorm_torch,
    rmsnorm_triton,
)
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


def naive_rmsnorm(x, weight, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight.double()


def test_torch_rmsnorm_kernel_reference_matches_naive():
    x, w = rand(5, 40), rand(40, seed=1)
    torch.testing.assert_close(
        rmsnorm_torch(x, w, 1e-5).double(), naive_rmsnorm(x, w, 1e-5), atol=1e-6, rtol=1e-6
    )


def test_torch_fused_add_rmsnorm_kernel_reference_is_add_then_norm():
    x, r, w = rand(5, 40, dtype=torch.bfloat16), rand(5, 40, dtype=torch.bfloat16, seed=1), rand(40, seed=2)
    normed, new_residual = fused_add_rmsnorm_torch(x, r, w.bfloat16(), 1e-6)
    assert torch.equal(new_residual, x + r)  # the residual stream, rounded as the model stores it
    assert torch.equal(normed, rmsnorm_torch(x + r, w.bfloat16(), 1e-6))
    want = naive_rmsnorm((x + r).double(), w.bfloat16(), 1e-6)
    torch.testing.assert_close(normed.double(), want, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 40), (2, 3, 64), (0, 16), (1, 1)], ids=str)
def test_triton_rmsnorm_kernel_matches_reference(interpreted_triton, dtype, shape):
    x, w = rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype, seed=1)
    got = rmsnorm_triton(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, rmsnorm_torch(x, w, 1e-6), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_fused_add_rmsnorm_kernel_matches_reference(interpreted_triton, dtype):
    x, r, w = rand(9, 48, dtype=dtype), rand(9, 48, dtype=dtype, seed=1), rand(48, dtype=dtype, seed=2)
    x_before, r_before = x.clone(), r.clone()
    normed, new_residual = fused_add_rmsnorm_triton(x, r, w, 1e-6)
    want_normed, want_residual = fused_add_rmsnorm_torch(x, r, w, 1e-6)
    torch.testing.assert_close(new_residual, want_residual, **TOLERANCE[dtype])
    torch.testing.assert_close(normed, want_normed, **TOLERANCE[dtype])
    assert torch.equal(x, x_before) and torch.equal(r, r_before)  # functional: inputs untouched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1024, 4096, 5120])
def test_triton_rmsnorm_kernels_on_cuda(dtype, hidden):
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 would run the CUDA test in the interpreter; unset it")
    x, r = (
        rand(2048, hidden, dtype=dtype, device="cuda"),
        rand(2048, hidden, dtype=dtype, device="cuda", seed=1),
    )
    w = rand(hidden, dtype=dtype, device="cuda", seed=2)
    torch.testing.assert_close(rmsnorm_triton(x, w, 1e-6), rmsnorm_torch(x, w, 1e-6), **TOLERANCE[dtype])
    for got, want in zip(
        fused_add_rmsnorm_triton(x, r, w, 1e-6), fused_add_rmsnorm_torch(x, r, w, 1e-6), strict=True
    ):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
