"""Linear layers packed for oneDNN on the CPU (layers/onednn.py, Linear.pack_for_cpu) against F.linear."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_attention_backends import cosine, embed, random_seqs, tiny  # noqa: F401 (a fixture)

from embedserve.gpu_proc import model_runner
from embedserve.gpu_proc.layers.activation import get_activation
from embedserve.gpu_proc.layers.linear import Linear
from embedserve.gpu_proc.layers.onednn import onednn_unavailable
from embedserve.gpu_proc.model_runner import ModelRunner
from embedserve.model_config import load_model_config

pytestmark = pytest.mark.skipif(
    onednn_unavailable(torch.device("cpu"), torch.float32) is not None, reason="this torch has no oneDNN"
)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.1, rtol=2e-2)}


def pair(dtype: torch.dtype, bias: bool = True) -> tuple[Linear, Linear]:
    """The same random layer twice: plain, and packed."""
    torch.manual_seed(0)
    plain = Linear(96, 160, bias=bias).to(dtype)
    packed = Linear(96, 160, bias=bias).to(dtype)
    packed.load_state_dict(plain.state_dict())
    packed.pack_for_cpu()
    return plain, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_forward_matches_f_linear(dtype, rows, bias):
    plain, packed = pair(dtype, bias)
    x = torch.randn(rows, 96).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_fused_activation_is_the_activation(dtype, act):
    plain, packed = pair(dtype)
    x = torch.randn(50, 96).to(dtype)
    with torch.inference_mode():
        want = get_activation(act)(plain(x))
        torch.testing.assert_close(packed.forward_act(x, act), want, **TOL[dtype])
        torch.testing.assert_close(plain.forward_act(x, act), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_add(dtype):
    plain, packed = pair(dtype)
    x, residual = torch.randn(50, 96).to(dtype), torch.randn(50, 160).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(packed.forward_add(x, residual), plain(x) + residual, **TOL[dtype])


def test_strided_input_is_read_correctly():
    plain, packed = pair(torch.float32)
    x = torch.randn(40, 3, 96)[:, 1]  # every third row of a wider tensor
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, plain.weight, plain.bias), atol=1e-4, rtol=1e-4)


def test_packing_drops_the_plain_weight():
    _, packed = pair(torch.float32)
    assert packed.weight.numel() == 0 and packed.packed is not None


def test_runner_packs_every_linear_and_keeps_the_embeddings(tiny, caplog, monkeypatch):  # noqa: F811
    folder = tiny("bert", "mean")
    with caplog.at_level(logging.INFO, logger="embedserve.gpu_proc.model_runner"):
        runner = ModelRunner(load_model_config(str(folder)), device="cpu", dtype="float32")
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert f"Linear layers packed for oneDNN: {len(linears)}" in caplog.messages

    monkeypatch.setattr(model_runner, "onednn_unavailable", lambda device, dtype: "turned off by the test")
    with caplog.at_level(logging.INFO, logger="embedserve.gpu_proc.model_runner"):
        unpacked = ModelRunner(load_model_config(str(folder)), device="cpu", dtype="float32")
    assert all(m.packed is None for m in unpacked.model.modules() if isinstance(m, Linear))
    assert "Linear layers run through F.linear: turned off by the test" in caplog.messages
    seqs = random_seqs([3, 30, 11])
    assert cosine(embed(runner, seqs), embed(unpacked, seqs)).min() > 0.99999
