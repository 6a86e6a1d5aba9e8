"""The kernels package: importable without triton, and the dispatchers keep CPU tensors on the torch references."""

from __future__ import annotations

import subprocess
import sys

import torch

import embedserve.kernels as kernels
from embedserve.kernels.runtime import dispatch


def test_kernel_package_imports_and_runs_without_triton():
    # NOTE: a None entry in sys.modules makes `import triton` raise ImportError, as on the CPU install.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, embedserve.kernels as K\n"
        "x = torch.randn(3, 8)\n"
        "assert K.rmsnorm(x, torch.ones(8)).shape == (3, 8)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_kernel_dispatch_keeps_cpu_tensors_on_the_reference(monkeypatch):
    """Even under TRITON_INTERPRET=1, which CI sets for the whole run, CPU inference must not use the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = dispatch("op", lambda x, scale: "torch", lambda x, scale: "triton")
    assert op(torch.zeros(2), scale=1.0) == "torch"
    assert op.__name__ == "op"


def test_kernel_dispatchers_carry_the_reference_docs():
    assert kernels.pool_normalize.__name__ == "pool_normalize"
    assert kernels.pool_normalize.__doc__ == kernels.pool_normalize_torch.__doc__
