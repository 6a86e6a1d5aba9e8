"""embedserve's C attention kernel (kernels/cpu_attention.c) against torch's SDPA, sequence by sequence.

The kernel is built by the test session's first call (about a second with the machine's `cc`); a
machine without a compiler must fall back to the torch backend, which a subprocess checks with CC
pointing nowhere and an empty build cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_attention_backends import cosine, embed, make_runner, random_seqs, tiny  # noqa: F401 (a fixture)

from embedserve.kernels.cpu_attention import (
    SOURCE,
    KernelBuildError,
    compile_kernel,
    cpu_attention,
    cpu_attention_unavailable,
    load_kernel,
)

pytestmark = pytest.mark.skipif(
    cpu_attention_unavailable() is not None, reason=f"no CPU kernel here: {cpu_attention_unavailable()}"
)
LENS = [1, 7, 15, 16, 17, 33, 64, 250, 3]


def reference(q, k, v, lens, scale, causal):
    """SDPA per sequence in float64, grouped heads repeated."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(out)


def packed_qkv(lens, heads, kv_heads, dim, dtype, seed=0):
    """q, k, v as strided views of one fused projection output, as the models produce them."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(sum(lens), (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = fused.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    return q.unflatten(1, (heads, dim)), k.unflatten(1, (kv_heads, dim)), v.unflatten(1, (kv_heads, dim))


def cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads,dim", [(12, 12, 32), (4, 4, 16), (8, 2, 64), (2, 1, 128)])
def test_kernel_matches_sdpa_in_float32(heads, kv_heads, dim, causal):
    q, k, v = packed_qkv(LENS, heads, kv_heads, dim, torch.float32)
    scale = dim**-0.5
    got = cpu_attention(q, k, v, cu(LENS), scale, causal)
    torch.testing.assert_close(got.double(), reference(q, k, v, LENS, scale, causal), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_in_bfloat16_is_float32_math_rounded_once(causal):
    q, k, v = packed_qkv(LENS, 12, 12, 32, torch.bfloat16)
    got = cpu_attention(q, k, v, cu(LENS), 32**-0.5, causal)
    assert got.dtype == torch.bfloat16
    want = reference(q, k, v, LENS, 32**-0.5, causal)
    # NOTE: inputs are bf16 values, the math float32, the output rounded once: within bf16's half-ulp.
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=8e-3)


def test_peaked_scores_keep_their_accuracy():
    """Large logits (a sharp softmax) stress the kernel's own exp and the max subtraction."""
    q, k, v = packed_qkv([40, 200], 4, 4, 32, torch.float32, seed=3)
    got = cpu_attention(q, k, v, cu([40, 200]), 4.0, False)
    torch.testing.assert_close(got.double(), reference(q, k, v, [40, 200], 4.0, False), atol=1e-5, rtol=1e-5)


def test_threads_split_the_work_without_changing_a_bit():
    q, k, v = packed_qkv(LENS * 3, 12, 12, 32, torch.float32)
    one = cpu_attention(q, k, v, cu(LENS * 3), 0.2, False, num_threads=1)
    for threads in (2, 3, 64):
        assert torch.equal(cpu_attention(q, k, v, cu(LENS * 3), 0.2, False, num_threads=threads), one)


def test_bad_arguments_are_refused():
    q, k, v = packed_qkv([4, 4], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        cpu_attention(q, k, v, np.array([0, 5, 7]), 1.0, False)
    with pytest.raises(ValueError, match="multiple of 16"):
        q2, k2, v2 = packed_qkv([4], 2, 2, 24, torch.float32)
        cpu_attention(q2, k2, v2, cu([4]), 1.0, False)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_attention(q, k.double(), v, cu([4, 4]), 1.0, False)


@pytest.mark.parametrize("family", ["bert", "qwen2", "llama"])
def test_models_on_the_kernel_match_the_torch_backend(tiny, family):  # noqa: F811 (the fixture)
    seqs = random_seqs([5, 1, 40, 17, 3])
    ours = embed(make_runner(tiny(family), "cpu"), seqs)
    ref = embed(make_runner(tiny(family), "torch"), seqs)
    assert cosine(ours, ref).min() >= 0.99999


def test_without_a_compiler_auto_falls_back_to_torch(tmp_path):
    code = textwrap.dedent(
        """
        from embedserve.gpu_proc.layers.attention import get_attention_backend
        from embedserve.kernels.cpu_attention import cpu_attention_unavailable
        print(cpu_attention_unavailable())
        print(get_attention_backend("auto", "cpu").name)
        """
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), EMBEDSERVE_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reason, backend = done.stdout.strip().splitlines()
    assert "building the CPU attention kernel failed" in reason
    assert backend == "torch"


def test_a_build_loaded_by_path_computes_what_the_cached_build_does(tmp_path):
    """compile_kernel + load_kernel (how bench/attention_kernel.py times an older source) give a
    working library; a source that does not compile says why."""
    target = tmp_path / "kernel.so"
    compile_kernel(SOURCE, target)
    q, k, v = packed_qkv(LENS, 4, 2, 32, torch.bfloat16)
    expected = cpu_attention(q, k, v, cu(LENS), 0.2, False)
    assert torch.equal(cpu_attention(q, k, v, cu(LENS), 0.2, False, library=load_kernel(target)), expected)
    broken = tmp_path / "broken.c"
    broken.write_text("int embedserve_attention(void) { return }\n")
    with pytest.raises(KernelBuildError, match="building the CPU attention kernel failed"):
        compile_kernel(broken, tmp_path / "broken.so")
