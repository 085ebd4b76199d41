"""The router's Triton kernel (kernels.triton_router: top-k, gate weights and counts in one pass,
the logits' gradient in one more) against a per-token loop of the definitions and against the
torch path of moe.routers.TopKRouter: the same choices and counts, weights and gradients equal up
to fp32 rounding.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when
there is no CUDA); the `gpu` tests run a layer-sized router on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.triton_ops import ROUTING_MAX_EXPERTS, topk_route_triton, triton_usable  # noqa: E402
from moe.config import MoEConfig  # noqa: E402
from moe.routers import TopKRouter  # noqa: E402

CUDA = torch.cuda.is_available()
interpreter = pytest.mark.skipif(not triton_usable(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 for CPU tensors")
VARIANTS = [(score, normalize, bias) for score in ("softmax", "sigmoid") for normalize in (True, False)
            for bias in (False, True)]


def naive_route(logits: torch.Tensor, top_k: int, bias, score: str, normalize: bool):
    """Token by token in float64, from the definitions: scores, the k best of score + bias (of the
    logits for softmax without a bias: the same order), weights from the unbiased scores."""
    tokens, experts = logits.shape
    indices, weights = [], []
    for t in range(tokens):
        row = [float(v) for v in logits[t]]
        if score == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        if bias is not None:
            key = [s + float(b) for s, b in zip(scores, bias)]
        else:
            key = row if score == "softmax" else scores
        chosen = sorted(range(experts), key=lambda e: (-key[e], e))[:top_k]
        picked = [scores[e] for e in chosen]
        if normalize:
            picked = [p / sum(picked) for p in picked]
        indices.append(chosen)
        weights.append(picked)
    counts = torch.bincount(torch.tensor(indices).flatten(), minlength=experts)
    return torch.tensor(indices), torch.tensor(weights, dtype=torch.float64), counts


def torch_route(logits: torch.Tensor, top_k: int, bias, score: str, normalize: bool):
    """The same with torch ops (differentiable): the weights' reference gradient."""
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    key = scores.detach() + bias if bias is not None else (logits.detach() if score == "softmax" else scores.detach())
    indices = key.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return indices, weights


SHAPES = [
    pytest.param(1, 1, 1, id="one-expert"),
    pytest.param(37, 8, 2, id="odd-tokens"),
    pytest.param(50, 64, 6, id="fine-grained"),
    pytest.param(20, 5, 5, id="k-equals-E"),
    pytest.param(19, 256, 8, id="256-experts"),
    pytest.param(5, ROUTING_MAX_EXPERTS, 3, id="most-experts"),
]


@interpreter
@pytest.mark.parametrize("tokens,experts,top_k", SHAPES)
@pytest.mark.parametrize("score,normalize,use_bias", VARIANTS)
def test_kernel_equals_the_definition(tokens, experts, top_k, score, normalize, use_bias):
    g = torch.Generator().manual_seed(tokens * 1000 + experts)
    logits = torch.randn(tokens, experts, generator=g) * 2
    bias = torch.randn(experts, generator=g) * 0.05 if use_bias else None
    indices, weights, counts = topk_route_triton(logits.clone().requires_grad_(), top_k, bias, score, normalize)
    want_indices, want_weights, want_counts = naive_route(logits, top_k, bias, score, normalize)
    assert indices.dtype == torch.int64 and weights.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(indices, want_indices)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(weights.double(), want_weights, rtol=1e-5, atol=1e-6)


@interpreter
@pytest.mark.parametrize("score,normalize,use_bias", VARIANTS)
def test_logits_gradient_equals_autograd_of_the_formulas(score, normalize, use_bias):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(45, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.05 if use_bias else None
    grad_weights = torch.randn(45, 4, generator=g)
    ours = logits.clone().requires_grad_()
    _, weights, _ = topk_route_triton(ours, 4, bias, score, normalize)
    (weights * grad_weights).sum().backward()
    reference = logits.double().requires_grad_()
    _, ref_weights = torch_route(reference, 4, None if bias is None else bias.double(), score, normalize)
    (ref_weights * grad_weights.double()).sum().backward()
    torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-6)


@interpreter
def test_no_tokens():
    indices, weights, counts = topk_route_triton(torch.zeros(0, 6), 2, None, "softmax", True)
    assert indices.shape == weights.shape == (0, 2)
    assert torch.equal(counts, torch.zeros(6, dtype=torch.int64))


@interpreter
def test_op_registration_and_compile():
    """torch.library's checks of the op, and torch.compile (aot_eager, fullgraph) of routing plus
    a weighted sum: forward and backward equal eager."""
    logits, bias = torch.randn(20, 8), torch.randn(8) * 0.05
    torch.library.opcheck(torch.ops.slimmoe.topk_route, (logits.clone().requires_grad_(), 3, bias, "softmax", True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    grad_weights = torch.randn(20, 3)

    def routed(x):
        indices, weights, counts = topk_route_triton(x, 3, bias, "softmax", True)
        return (weights * grad_weights).sum() + indices.sum() + counts.sum()

    eager_x, compiled_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = routed(eager_x)
    eager.backward()
    compiled = torch.compile(routed, backend="aot_eager", fullgraph=True)(compiled_x)
    compiled.backward()
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_x.grad, eager_x.grad)


@interpreter
@pytest.mark.parametrize("args,message", [
    ((torch.zeros(4, 6, dtype=torch.float64), 2), "expects fp32 logits"),
    ((torch.zeros(6), 2), "expects fp32 logits"),
    ((torch.zeros(4, 6), 7), "top_k=7 must be an integer in 1..6"),
    ((torch.zeros(4, 6), 0), "top_k=0"),
    ((torch.zeros(4, ROUTING_MAX_EXPERTS + 1), 2), "the kernel takes"),
    ((torch.zeros(4, 6), 2, torch.zeros(5)), "bias must be fp32 \\[6\\]"),
    ((torch.zeros(4, 6), 2, None, "relu"), "unknown score"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        topk_route_triton(*args)


ROUTER_CONFIGS = [
    pytest.param(dict(router="learned"), id="learned-softmax"),
    pytest.param(dict(router="random", balance="bias"), id="random-bias"),
    pytest.param(dict(router="learned", score_function="sigmoid", balance="bias"), id="sigmoid-bias"),
    pytest.param(dict(router="learned", normalize_topk=False), id="unnormalised"),
    pytest.param(dict(router="learned", z_loss_coeff=1e-3), id="z-loss"),
]


@interpreter
@pytest.mark.parametrize("options", ROUTER_CONFIGS)
def test_router_with_the_kernel_equals_the_torch_path(options, monkeypatch):
    """TopKRouter with the kernel (SLIMMOE_TRITON_ON_CPU=1) and without (SLIMMOE_ROUTING_KERNELS=0):
    the same choices, counts and pending bias counts; weights and every gradient equal up to rounding."""
    config = MoEConfig(hidden_size=24, ffn_hidden_size=16, num_experts=12, top_k=3, **options)
    runs = {}
    for kernel in (True, False):
        monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
        monkeypatch.setenv("SLIMMOE_ROUTING_KERNELS", "1" if kernel else "0")
        torch.manual_seed(0)
        router = TopKRouter(config).train()
        if router.expert_bias is not None:
            router.expert_bias.copy_(torch.randn(12) * 0.02)
        x = torch.randn(40, 24, requires_grad=True)
        routing = router(x, 3)
        loss = (routing.weights * torch.linspace(-1, 1, 3)).sum() + (routing.z_loss if routing.z_loss is not None else 0)
        loss.backward()
        runs[kernel] = (routing, x.grad, router.weight.grad if router.is_learned else None,
                        getattr(router, "pending_tokens", None))
    (ours, ours_x, ours_w, ours_pending), (ref, ref_x, ref_w, ref_pending) = runs[True], runs[False]
    assert torch.equal(ours.indices, ref.indices)
    assert torch.equal(ours.tokens_per_expert, ref.tokens_per_expert)
    assert torch.equal(ours.routed_per_expert, ref.routed_per_expert)
    torch.testing.assert_close(ours.weights, ref.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_x, ref_x, rtol=1e-5, atol=1e-6)
    if ours_w is not None:
        torch.testing.assert_close(ours_w, ref_w, rtol=1e-5, atol=1e-6)
    if ours_pending is not None:
        assert torch.equal(ours_pending, ref_pending)


@interpreter
def test_probability_losses_keep_the_torch_path(monkeypatch):
    """The aux and mutual-information losses need all E probabilities: those routers never take the kernel."""
    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    calls = []
    real = kernels.topk_route_triton
    monkeypatch.setattr(kernels, "topk_route_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for options in (dict(balance="aux_loss"), dict(mi_loss_coeff=0.01)):
        router = TopKRouter(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, **options)).train()
        assert router(torch.randn(5, 8), 2).aux_loss is not None or options.get("mi_loss_coeff")
    assert not calls
    TopKRouter(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2))(torch.randn(5, 8), 2)
    assert calls


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("score,normalize,use_bias", VARIANTS)
def test_kernel_on_cuda_equals_the_formulas(score, normalize, use_bias):
    """A layer-sized router on CUDA (T=16384, E=64, k=6): choices and counts equal torch's, weights
    and the logits' gradient equal up to fp32 rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(16384, 64, device="cuda", generator=g) * 2
    bias = torch.randn(64, device="cuda", generator=g) * 0.05 if use_bias else None
    grad_weights = torch.randn(16384, 6, device="cuda", generator=g)
    ours, reference = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    indices, weights, counts = topk_route_triton(ours, 6, bias, score, normalize)
    (weights * grad_weights).sum().backward()
    ref_indices, ref_weights = torch_route(reference, 6, bias, score, normalize)
    (ref_weights * grad_weights).sum().backward()
    assert torch.equal(indices, ref_indices)
    assert torch.equal(counts, torch.bincount(ref_indices.flatten(), minlength=64))
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-6)
