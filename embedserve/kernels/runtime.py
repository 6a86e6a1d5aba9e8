"""Where a Triton kernel can run, how big its blocks are, and which implementation a call gets.

NOTE: nothing here imports triton at module level: `import embedserve.kernels` must work on the CPU
install, which has no triton. Each `*_jit.py` module (the `@triton.jit` bodies) is imported inside the
launcher that needs it. Triton decides interpreted-or-compiled when it decorates a function, its own
library's included, so TRITON_INTERPRET=1 must be set before anything imports triton.language.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


def interpreting() -> bool:
    """True when triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raises a readable error where a launch would fail deep inside triton."""
    if not triton_installed():
        raise RuntimeError("the Triton kernels need the `triton` package (pip install embedserve[gpu])")
    if interpreting():
        _check_interpreter_complete()
        return
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(
                f"Triton kernels need CUDA tensors (got one on {t.device}); "
                "set TRITON_INTERPRET=1 to run them on CPU tensors, slowly"
            )


def _check_interpreter_complete() -> None:
    """Fails clearly where TRITON_INTERPRET=1 came too late for triton's own library.

    NOTE: triton.language's helpers (tl.zeros, tl.sum, ...) are themselves `@triton.jit` functions,
    interpreted or compiled as of the moment triton.language is first imported. Set the variable after
    that (transformers' model imports pull triton in) and every interpreted kernel dies on its first
    helper call with "Cannot call @triton.jit'd outside of the scope of a kernel".
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton.language was imported, so triton's library is "
            "compiled-only; set it before anything imports triton (in the environment, or first thing "
            "in conftest.py)"
        )


def block_size(on_gpu: int, interpreted: int) -> int:
    """A block size: GPU-sized when compiled, small when interpreted (every lane costs numpy time)."""
    return interpreted if interpreting() else on_gpu


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor): triton blocks are powers of two, tails are masked."""
    n = max(n, floor, 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dispatch(name: str, torch_impl: F, triton_impl: F) -> F:
    """`name`: runs `triton_impl` on CUDA tensors when triton is installed, else `torch_impl`.

    The first positional argument decides; both take the same arguments.

    NOTE: CPU tensors always get the torch reference, even under TRITON_INTERPRET=1: CI sets that
    variable for the whole test run, and CPU inference must not crawl through the interpreter. Tests
    call the `*_triton` functions directly.
    """

    def run(first: torch.Tensor, *args, **kwargs):
        if first.is_cuda and triton_installed():
            return triton_impl(first, *args, **kwargs)
        return torch_impl(first, *args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = torch_impl.__doc__
    return run  # type: ignore[return-value]
