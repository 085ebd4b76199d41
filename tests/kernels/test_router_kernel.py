"""The router's Triton kernel (kernels.triton_router: top-k, gate weights and counts in one pass,
the logits' gradient in one more) against a per-token loop of the definitions and against the
same formulas in torch ops: the same choices and counts, weights and gradients equal up to fp32
rounding. (tests/moe/test_routing_kernels.py checks moe.routers.TopKRouter with and without it.)

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when
there is no CUDA); the `gpu` tests run a layer-sized router on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from kernels.triton_ops import ROUTING_MAX_EXPERTS, topk_route_triton, triton_usable  # noqa: E402
from tests.kernels.ops import check_op_and_compile  # noqa: E402

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
    logits, bias, grad_weights = torch.randn(20, 8), torch.randn(8) * 0.05, torch.randn(20, 3)

    def loss(x):
        indices, weights, counts = topk_route_triton(x, 3, bias, "softmax", True)
        return (weights * grad_weights).sum() + indices.sum() + counts.sum()

    check_op_and_compile(torch.ops.slimmoe.topk_route, (logits.clone().requires_grad_(), 3, bias, "softmax", True),
                         loss, logits)


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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("score,normalize,use_bias", [  # four of the eight variants: each compiles twice
    ("softmax", True, True), ("softmax", True, False), ("sigmoid", True, True), ("softmax", False, False)])
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
