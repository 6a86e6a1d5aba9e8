"""Pooling fused with the `dimensions` cut and L2 norm: reference against a per-sequence loop, Triton against the reference.

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

from embedserve.kernels import pool_normalize_torch, pool_normalize_triton
from embedserve.kernels.runtime import interpreting

LENS = [1, 5, 13, 1, 9]  # ragged; 13 spans several of the interpreter's 4-token tiles
OPTIONS = {  # (normalize, dimensions)
    "raw": (False, None),
    "normalized": (True, None),
    "cut": (False, 7),  # a cut always renormalises
    "cut_normalized": (True, 16),
}


@pytest.fixture
def interpreted_triton():
    pytest.importorskip("triton", reason="triton is not installed: pip install triton")
    if not interpreting():
        pytest.skip("CPU-tensor kernel tests need TRITON_INTERPRET=1 (unset on CUDA machines)")


def packed(lens, hidden, dtype=torch.float32, device="cpu"):
    x = torch.randn(sum(lens), hidden, generator=torch.Generator().manual_seed(0)).to(
        dtype=dtype, device=device
    )
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return x, cu.to(device)


def naive_pool(hidden, lens, mode, normalize, dimensions):
    out, start = [], 0
    for n in lens:
        rows = hidden[start : start + n].double()
        vec = {"cls": rows[0], "last": rows[-1], "mean": rows.sum(0) / n}[mode][
            : dimensions or hidden.shape[1]
        ]
        out.append(vec / vec.norm() if normalize or dimensions else vec)
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("mode", ["cls", "last", "mean"])
def test_torch_pool_normalize_kernel_reference_matches_naive(mode, option):
    hidden, cu = packed(LENS, 24)
    got = pool_normalize_torch(hidden, cu, mode, *option)
    assert got.dtype == torch.float32 and got.shape == (len(LENS), option[1] or 24)
    torch.testing.assert_close(got.double(), naive_pool(hidden, LENS, mode, *option), atol=1e-6, rtol=1e-6)


def test_torch_pool_normalize_kernel_rejects_bad_arguments():
    hidden, cu = packed(LENS, 24)
    with pytest.raises(ValueError, match="pooling"):
        pool_normalize_torch(hidden, cu, "max")
    with pytest.raises(ValueError, match="dimensions"):
        pool_normalize_torch(hidden, cu, "mean", dimensions=25)


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("mode", ["cls", "last", "mean"])
def test_triton_pool_normalize_kernel_matches_reference(interpreted_triton, mode, option):
    hidden, cu = packed(LENS, 24)
    got = pool_normalize_triton(hidden, cu, mode, *option)
    torch.testing.assert_close(got, pool_normalize_torch(hidden, cu, mode, *option), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_pool_normalize_kernel_reads_half_precision(interpreted_triton, dtype):
    hidden, cu = packed(LENS, 24, dtype)
    got = pool_normalize_triton(hidden, cu, "mean", True, None)
    assert got.dtype == torch.float32  # sums and norms in float32 whatever the model's dtype
    torch.testing.assert_close(
        got, pool_normalize_torch(hidden, cu, "mean", True, None), atol=1e-6, rtol=1e-5
    )


def test_triton_pool_normalize_kernel_handles_strided_hidden(interpreted_triton):
    wide, cu = packed(LENS, 48)
    hidden = wide[:, ::2]  # no unit stride: copied before the launch
    got = pool_normalize_triton(hidden, cu, "last", True, None)
    torch.testing.assert_close(
        got, pool_normalize_torch(hidden, cu, "last", True, None), atol=1e-6, rtol=1e-5
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["cls", "last", "mean"])
@pytest.mark.parametrize("hidden_size", [1024, 4096])
def test_triton_pool_normalize_kernel_on_cuda(dtype, mode, hidden_size):
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 would run the CUDA test in the interpreter; unset it")
    lens = [2048, 1, 700, 129, 33, 512]
    hidden, cu = packed(lens, hidden_size, dtype, device="cuda")
    for normalize, dims in [(True, None), (False, None), (True, 256)]:
        got = pool_normalize_triton(hidden, cu, mode, normalize, dims)
        want = pool_normalize_torch(hidden, cu, mode, normalize, dims)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
