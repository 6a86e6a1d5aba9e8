"""The CPU attention kernel (`cpu_attention.c`): built once per machine with the host's C compiler,
loaded with ctypes, called on torch tensors' memory.

    cpu_attention(q, k, v, cu_seqlens, scale, causal) -> out [T, H, D]

NOTE: why C and not a torch extension: a plain C file with no torch or Python headers compiles in
about a second with `cc`, needs nothing but a compiler, and cannot break with a torch upgrade. The
build goes to a per-user cache keyed by the source, the flags and the CPU (it is built with
-march=native, so a cache shared between different machines must not mix builds). Without a
compiler, `cpu_attention_unavailable()` says why and the torch path serves instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
# NOTE: no -ffast-math: the C code is written so that GCC vectorises it under IEEE rules.
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
LANES = 16  # VL in the C source: head_dim must be a multiple of it
_BUILD_TIMEOUT_S = 120


def cpu_attention_unavailable(dtype: torch.dtype | None = None) -> str | None:
    """Why the kernel cannot run (for `dtype`, when given), or None when it can."""
    if dtype is not None and dtype not in _DTYPE_CODES:
        return f"the CPU attention kernel takes float32 or bfloat16, not {dtype}"
    try:
        _library()
    except KernelBuildError as exc:
        return str(exc)
    return None


def cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: np.ndarray,
    scale: float,
    causal: bool,
    num_threads: int | None = None,
    library: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """q [T, H, D], k and v [T, Hkv, D] (views with a contiguous last dim are fine); cu_seqlens int64
    [B + 1] on the host. Each token attends within its own sequence. Returns a new [T, H, D].
    `library`: another build of the kernel (`load_kernel`), for benchmarks against an older source."""
    tokens, heads, dim = q.shape
    if dim % LANES:
        raise ValueError(f"head_dim {dim} is not a multiple of {LANES}")
    for t in (q, k, v):
        if t.device.type != "cpu" or t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError("q, k, v must be CPU tensors of one dtype with a contiguous last dimension")
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != dim or heads % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    cu = np.ascontiguousarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or cu[0] != 0 or cu[-1] != tokens or (np.diff(cu) < 0).any():
        raise ValueError("cu_seqlens must rise from 0 to the number of tokens")
    out = torch.empty((tokens, heads, dim), dtype=q.dtype)
    strides = np.array(
        [q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)], np.int64
    )
    status = (library or _library()).embedserve_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        cu.ctypes.data, strides.ctypes.data, len(cu) - 1, heads, k.shape[1], dim,
        ctypes.c_float(scale), int(causal), _DTYPE_CODES[q.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"the CPU attention kernel failed (status {status}: out of memory or threads)")
    return out


class KernelBuildError(RuntimeError):
    pass


@functools.cache
def _library() -> ctypes.CDLL:
    return load_kernel(_build())


def load_kernel(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.embedserve_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_int] * 3
    return lib


def _build() -> Path:
    compiler = find_compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS).encode() + _cpu_identity().encode()).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # NOTE: built under a temporary name and renamed: servers starting together never load half a file.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        compile_kernel(SOURCE, Path(tmp), compiler)
        os.replace(tmp, target)
    except OSError as exc:
        raise KernelBuildError(f"installing the CPU attention kernel failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("Built the CPU attention kernel: %s", target)
    return target


def find_compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("no C compiler (cc or gcc) on PATH to build the CPU attention kernel")
    return compiler


def compile_kernel(source: Path, target: Path, compiler: str | None = None) -> None:
    cmd = [compiler or find_compiler(), *CFLAGS, "-o", str(target), str(source), "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"building the CPU attention kernel failed: {exc}") from exc
    if done.returncode != 0:
        raise KernelBuildError(f"building the CPU attention kernel failed: {done.stderr.strip()[-500:]}")


def _cache_dir() -> Path:
    base = os.environ.get("EMBEDSERVE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "embedserve" / "kernels"


def _cpu_identity() -> str:
    """The machine and its CPU's feature flags: a -march=native build is only valid where they match."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"
