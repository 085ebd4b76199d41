"""The Triton counting sort that groups a router's choices by expert (kernels.triton_grouping)
against a naive Python loop and a stable argsort: the same grouping, bitwise, and the gate
weights' gradient. (tests/moe/test_routing_kernels.py checks the layer's dispatch with and
without it.)

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when
there is no CUDA); the `gpu` tests run layer-sized cases on CUDA in bf16.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.triton_ops import GROUPING_MAX_EXPERTS, ROUTING_MAX_EXPERTS, group_by_expert_triton, triton_usable  # noqa: E402
from kernels.routing import routing_kernels  # noqa: E402
from tests.kernels.ops import check_op_and_compile  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
interpreter = pytest.mark.skipif(not triton_usable(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 for CPU tensors")


def naive_grouping(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Expert by expert, slot by slot: the definition of a stable grouping."""
    top_k = indices.shape[1]
    ids, flat = indices.flatten().tolist(), weights.flatten()
    order = [slot for expert in range(num_experts) for slot, e in enumerate(ids) if e == expert]
    source_order = [0] * len(order)
    for row, slot in enumerate(order):
        source_order[slot] = row
    ends, total = [], 0
    for expert in range(num_experts):
        total += ids.count(expert)
        ends.append(total)
    long = dict(dtype=torch.int64, device=indices.device)
    return (torch.tensor([slot // top_k for slot in order], **long), flat[torch.tensor(order, **long)],
            torch.tensor(source_order, **long), torch.tensor(ends, dtype=torch.int32, device=indices.device))


def routing_case(tokens: int, top_k: int, num_experts: int, skew: str = "uniform", device="cpu", seed=0):
    """indices [T, k] (distinct experts per token) and gate weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    if skew == "uniform":
        scores = torch.rand(tokens, num_experts, generator=g)
    elif skew == "zipf":  # most choices on the first few experts
        ranks = torch.arange(1, num_experts + 1, dtype=torch.float32)
        scores = torch.rand(tokens, num_experts, generator=g) / ranks**1.2
    else:  # "one": expert 0 first for every token, the others left out where k allows
        scores = torch.rand(tokens, num_experts, generator=g)
        scores[:, 0] = 2.0
    indices = scores.topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, generator=g)
    return indices.to(device), weights.to(device)


CASES = [
    pytest.param(1, 1, 1, "uniform", id="one-token-one-expert"),
    pytest.param(37, 3, 5, "uniform", id="odd-slots"),
    pytest.param(64, 1, 8, "uniform", id="one-block-exactly"),
    pytest.param(100, 2, 8, "one", id="one-expert-takes-all"),
    pytest.param(129, 6, 64, "zipf", id="fine-grained-skewed"),
    pytest.param(300, 8, 256, "uniform", id="256-experts"),
    pytest.param(70, 2, 1000, "uniform", id="many-empty-experts"),
    pytest.param(50, 4, GROUPING_MAX_EXPERTS, "zipf", id="most-experts"),
]


@interpreter
@pytest.mark.parametrize("tokens,top_k,num_experts,skew", CASES)
def test_grouping_equals_the_naive_loop_and_the_argsort(tokens, top_k, num_experts, skew):
    indices, weights = routing_case(tokens, top_k, num_experts, skew)
    row_index, row_weight, source_order, offsets = group_by_expert_triton(indices, weights, num_experts)
    want = naive_grouping(indices, weights, num_experts)
    for name, got, expected in zip(("row_index", "row_weight", "source_order", "offsets"),
                                   (row_index, row_weight, source_order, offsets), want):
        assert got.dtype == expected.dtype, name
        assert torch.equal(got, expected), f"{name} differs from the naive loop"
    order = torch.argsort(indices.flatten(), stable=True)  # a comparison sort's grouping: the same
    assert torch.equal(row_index, order // top_k) and torch.equal(row_weight, weights.flatten()[order])


@interpreter
def test_no_tokens():
    indices, weights = torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2)
    row_index, row_weight, source_order, offsets = group_by_expert_triton(indices, weights, 4)
    assert row_index.shape == row_weight.shape == source_order.shape == (0,)
    assert torch.equal(offsets, torch.zeros(4, dtype=torch.int32))


@interpreter
def test_gate_weight_gradient_is_the_permuted_row_gradient():
    indices, weights = routing_case(45, 3, 7, "zipf")
    weights.requires_grad_()
    _, row_weight, _, _ = group_by_expert_triton(indices, weights, 7)
    grad_rows = torch.randn(row_weight.shape[0])
    (row_weight * grad_rows).sum().backward()
    reference = weights.detach().clone().requires_grad_()
    order = torch.argsort(indices.flatten(), stable=True)
    (reference.flatten()[order] * grad_rows).sum().backward()
    assert torch.equal(weights.grad, reference.grad)


@interpreter
def test_op_registration_and_compile():
    indices, weights = routing_case(20, 2, 6)
    grad_rows = torch.randn(40)

    def loss(w):
        row_index, row_weight, source_order, offsets = group_by_expert_triton(indices, w, 6)
        return (row_weight * grad_rows).sum() + row_index.sum() + source_order.sum() + offsets.sum()

    check_op_and_compile(torch.ops.slimmoe.group_by_expert, (indices, weights.requires_grad_(), 6), loss, weights)


@interpreter
@pytest.mark.parametrize("indices,weights,num_experts,message", [
    (torch.zeros(6, dtype=torch.int64), torch.zeros(6), 4, "expects indices \\[T, k\\]"),
    (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 3), 4, "expects indices \\[T, k\\]"),
    (torch.zeros(3, 2), torch.zeros(3, 2), 4, "must be int64"),
    (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2), GROUPING_MAX_EXPERTS + 1, "the kernels take"),
    (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2), 0, "the kernels take"),
])
def test_bad_arguments_are_named(indices, weights, num_experts, message):
    with pytest.raises(ValueError, match=message):
        group_by_expert_triton(indices, weights, num_experts)


def test_where_the_kernels_apply(monkeypatch):
    """The grouping and the router kernel: CUDA always (up to their most experts); CPU only in the
    interpreter on request; SLIMMOE_ROUTING_KERNELS=0 nowhere. Decided from the device alone (no
    CUDA tensor needed here)."""
    on = types.SimpleNamespace(device=torch.device("cuda", 0))
    cpu = torch.zeros(1, 1, dtype=torch.int64)
    for applies, most in ((kernels.grouping_kernel_applies, GROUPING_MAX_EXPERTS),
                          (kernels.routing_kernel_applies, ROUTING_MAX_EXPERTS)):
        monkeypatch.delenv("SLIMMOE_TRITON_ON_CPU", raising=False)
        monkeypatch.delenv("SLIMMOE_ROUTING_KERNELS", raising=False)
        assert applies(on, 64)
        assert applies(on, most)
        assert not applies(on, most + 1)
        assert not applies(cpu, 8)
        monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
        assert applies(cpu, 8) == triton_usable(cpu)
        monkeypatch.setenv("SLIMMOE_ROUTING_KERNELS", "0")
        assert not applies(on, 64)
        assert not applies(cpu, 8)
        with routing_kernels(True):  # a benchmark's switch outranks the environment, both ways
            assert applies(on, 64)
        monkeypatch.setenv("SLIMMOE_ROUTING_KERNELS", "1")
        with routing_kernels(False):
            assert not applies(on, 64)
            with routing_kernels(True):
                assert applies(on, 64)
            assert not applies(on, 64)
        assert applies(on, 64)


@pytest.mark.parametrize("tokens,top_k,num_experts,skew", [
    pytest.param(16384, 6, 64, "uniform", id="fine-grained"),
    pytest.param(8192, 2, 8, "zipf", id="mixtral-like-skewed"),
    pytest.param(4099, 8, 256, "one", id="256-experts-one-hot"),
])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_grouping_on_cuda_equals_the_argsort(tokens, top_k, num_experts, skew):
    """Layer-sized groupings in bf16 on CUDA: the rows of a stable argsort, and its weights' gradient."""
    indices, weights = routing_case(tokens, top_k, num_experts, skew, device="cuda")
    weights = weights.to(torch.bfloat16).requires_grad_()
    row_index, row_weight, source_order, offsets = group_by_expert_triton(indices, weights, num_experts)
    order = torch.argsort(indices.flatten(), stable=True)
    assert torch.equal(row_index, order // top_k)
    assert torch.equal(source_order, torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda")))
    counts = torch.bincount(indices.flatten(), minlength=num_experts)
    assert torch.equal(offsets, torch.cumsum(counts, 0).to(torch.int32))
    grad_rows = torch.randn(row_weight.shape[0], device="cuda", dtype=torch.bfloat16)
    (grad_kernel,) = torch.autograd.grad((row_weight * grad_rows).sum(), weights)
    reference = weights.flatten()[order]
    assert torch.equal(row_weight, reference)
    (grad_sort,) = torch.autograd.grad((reference * grad_rows).sum(), weights)
    assert torch.equal(grad_kernel, grad_sort)
