"""The MoE layer on the Triton expert kernels (what the default backend, "auto", takes on CUDA for
most shapes): which path runs where, the layer against the loop backend, and torch.compile of the whole layer without graph breaks.

On CPU the kernels run in Triton's interpreter only when asked (``SLIMMOE_TRITON_ON_CPU=1``);
otherwise the default backend quietly takes the torch path. The GPU tests do the same in bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels.triton_ops as triton_ops
from moe import MoEConfig, MoELayer

triton = pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layers(device, dtype, **changes):
    cfg = dict(hidden_size=24, ffn_hidden_size=40, num_experts=6, top_k=2, router="learned", balance="aux_loss")
    torch.manual_seed(0)
    fast = MoELayer(MoEConfig(**{**cfg, **changes})).to(device=device, dtype=dtype)
    slow = copy.deepcopy(fast)
    slow.experts.backend = "loop"
    return fast, slow


def _close_to_scale(actual, expected, tol, name):
    """Every element within ``tol`` times the largest magnitude of ``expected``: a bf16 result is
    as good as its largest entries allow, so a fixed atol is too tight for a gradient of magnitude
    ~26 (one bf16 step there is 0.125) and too loose for one of magnitude 1e-3."""
    scale = float(expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
    error = float((actual.float() - expected.float()).abs().max())
    assert error <= tol * scale, f"{name}: max error {error:.3g} exceeds {tol} x max |expected| {scale:.3g}"


def _compare(fast, slow, x, atol, rtol, scaled_tol=None):
    """Outputs and every gradient; with ``scaled_tol`` (bf16), errors relative to each tensor's magnitude."""
    def check(actual, expected, name):
        if scaled_tol is None:
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=name)
        else:
            _close_to_scale(actual, expected, scaled_tol, name)

    x_fast, x_slow = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_slow = fast(x_fast), slow(x_slow)
    check(out_fast, out_slow, "output")
    grad = torch.randn_like(out_fast)
    (out_fast * grad).sum().backward()
    (out_slow * grad).sum().backward()
    check(x_fast.grad, x_slow.grad, "x.grad")
    for (name, p_fast), (_, p_slow) in zip(fast.named_parameters(), slow.named_parameters()):
        check(p_fast.grad, p_slow.grad, name)


def test_default_backend_is_auto_and_cpu_takes_the_torch_path_quietly(monkeypatch):
    assert MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1).expert_backend == "auto"
    monkeypatch.delenv("SLIMMOE_TRITON_ON_CPU", raising=False)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton kernels ran on CPU without being asked to")

    monkeypatch.setattr(triton_ops, "expert_mlp_triton", no_triton)
    fast, slow = _layers("cpu", torch.float32)
    _compare(fast, slow, torch.randn(3, 5, 24), atol=1e-5, rtol=1e-5)


def test_layer_on_the_triton_kernels_matches_the_loop_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    if not triton_ops.triton_usable(torch.zeros(1)):
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py on machines without CUDA)")
    calls = []
    original = triton_ops.expert_mlp_triton
    monkeypatch.setattr(triton_ops, "expert_mlp_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast, slow = _layers("cpu", torch.float32)
    _compare(fast, slow, torch.randn(2, 5, 24), atol=1e-4, rtol=1e-4)
    assert calls  # the layer really went through the Triton kernels


def test_the_layer_compiles_without_graph_breaks(monkeypatch):
    """``torch.compile(fullgraph=True)``: routing, sorting and the custom op trace as one graph
    (fullgraph raises on any break), and the compiled layer computes what eager does."""
    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    if not triton_ops.triton_usable(torch.zeros(1)):
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py on machines without CUDA)")
    torch._dynamo.reset()
    layer, _ = _layers("cpu", torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 24)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_eager, out_compiled = layer(x_eager), compiled(x_compiled)
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-5)
    out_compiled.sum().backward()
    out_eager.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-5, rtol=1e-5)


@gpu
@pytest.mark.gpu
def test_layer_uses_the_triton_kernels_on_cuda_in_bf16(monkeypatch):
    calls = []
    original = triton_ops.expert_mlp_triton
    monkeypatch.setattr(triton_ops, "expert_mlp_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast, slow = _layers("cuda", torch.bfloat16, hidden_size=256, ffn_hidden_size=512, num_experts=8)
    _compare(fast, slow, torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16), atol=None, rtol=None,
             scaled_tol=2e-2)
    assert calls


@gpu
@pytest.mark.gpu
def test_the_layer_compiles_with_inductor_on_cuda():
    torch._dynamo.reset()
    layer, _ = _layers("cuda", torch.bfloat16, hidden_size=256, ffn_hidden_size=512, num_experts=8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    _close_to_scale(compiled(x), layer(x), 2e-2, "compiled output")


def test_scaled_tolerance_follows_the_magnitude_of_the_expected_tensor():
    expected = torch.tensor([26.0, -3.0, 0.5])
    _close_to_scale(expected + 0.4, expected, 2e-2, "large")  # 0.4 <= 0.02 * 26
    with pytest.raises(AssertionError, match="exceeds"):
        _close_to_scale(expected + 0.6, expected, 2e-2, "large")
    with pytest.raises(AssertionError, match="exceeds"):
        _close_to_scale(expected * 1e-3 + 0.03, expected * 1e-3, 2e-2, "small")  # an atol of 3e-2 would pass it
