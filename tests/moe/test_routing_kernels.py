"""The MoE layer's routing with the Triton routing kernels (kernels.routing) and without them
(SLIMMOE_ROUTING_KERNELS=0): TopKRouter makes the same choices, counts and pending bias counts with
weights and gradients equal up to fp32 rounding, and sort_by_expert groups the same rows. On CPU
the kernels run in Triton's interpreter (SLIMMOE_TRITON_ON_CPU=1 with TRITON_INTERPRET=1); the gpu
test runs the layer's dispatch on CUDA in bf16.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.triton_ops import triton_usable  # noqa: E402
from moe.config import MoEConfig  # noqa: E402
from moe.layer import MoELayer  # noqa: E402
from moe.dispatch import sort_by_expert  # noqa: E402
from moe.routers import Routing, TopKRouter, expert_counts  # noqa: E402

CUDA = torch.cuda.is_available()
interpreter = pytest.mark.skipif(not triton_usable(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 for CPU tensors")


def routing_case(tokens: int, top_k: int, num_experts: int, device="cpu", seed=0):
    """indices [T, k] (distinct experts per token, skewed towards the first ones) and weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=g) / torch.arange(1, num_experts + 1) ** 1.2
    return scores.topk(top_k, dim=1).indices.to(device), torch.rand(tokens, top_k, generator=g).to(device)


@interpreter
@pytest.mark.parametrize("tokens,top_k,num_experts", [(1, 1, 1), (37, 3, 5), (129, 6, 64), (70, 2, 300)])
def test_dispatch_groups_the_same_rows_with_and_without_the_kernel(tokens, top_k, num_experts, monkeypatch):
    indices, weights = routing_case(tokens, top_k, num_experts)
    counts = expert_counts(indices.flatten(), num_experts)
    routing = Routing(indices, weights, counts, counts)
    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    assert kernels.grouping_kernel_applies(indices, num_experts)
    by_kernel = sort_by_expert(torch.zeros(tokens, 1), routing, num_experts)
    monkeypatch.setenv("SLIMMOE_ROUTING_KERNELS", "0")
    by_sort = sort_by_expert(torch.zeros(tokens, 1), routing, num_experts)
    assert by_kernel.offsets is not None and by_sort.offsets is None
    assert torch.equal(by_kernel.offsets, kernels.offsets_from_counts(counts))
    for name in ("row_index", "row_weight", "source_order", "tokens_per_expert"):
        assert torch.equal(getattr(by_kernel, name), getattr(by_sort, name)), name


@interpreter
def test_capacity_dropping_keeps_the_argsort(monkeypatch):
    """Dropped choices leave rows out; the kernel groups every slot, so dropping takes the argsort."""
    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    indices, weights = routing_case(12, 2, 4)
    kept = torch.ones_like(indices, dtype=torch.bool)
    kept[0, 1] = False
    counts = expert_counts(indices.masked_fill(~kept, 4).flatten(), 5)[:-1]
    rows = sort_by_expert(torch.zeros(12, 1), Routing(indices, weights * kept, counts, counts, kept=kept), 4)
    assert rows.offsets is None and rows.source_order is None and rows.row_index.shape == (23,)


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


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@interpreter
def test_eager_calls_the_kernels_without_the_ops_dispatch_and_compile_traces_the_ops(monkeypatch):
    """Eager code runs the Triton ops' bodies through autograd Functions (a torch.library op's
    dispatch costs host time on every call); torch.compile traces the slimmoe:: ops into its forward
    and backward graphs. Same kernels: the same outputs and gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    config = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, router="learned", balance="bias",
                       activation="gelu", expert_backend="triton")
    layer = MoELayer(config).train()
    layer.router.expert_bias.copy_(torch.tensor([0.01, -0.02, 0.0, 0.03]))
    x = torch.randn(8, 16)
    traced = set()

    def record(graph_module, example_inputs):
        traced.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module)

    results = {}
    for mode in ("eager", "compiled"):
        run = layer if mode == "eager" else torch.compile(layer, backend=aot_autograd(fw_compiler=record,
                                                                                      bw_compiler=record),
                                                          fullgraph=True)
        inputs = x.clone().requires_grad_()
        layer.zero_grad()
        ops = _OpNames()
        with ops if mode == "eager" else contextlib.nullcontext():
            out = run(inputs)
            out.backward(torch.ones_like(out))
        if mode == "eager":
            assert not {name for name in ops.names if name.startswith("slimmoe.")}, ops.names
        results[mode] = (out.detach(), inputs.grad, layer.router.weight.grad.clone(), layer.experts.w1.grad.clone())
    for op in ("topk_route", "topk_route_backward", "group_by_expert", "expert_mlp", "expert_mlp_backward"):
        assert any(f"slimmoe.{op}." in name for name in traced), (op, sorted(traced))
    for eager, compiled in zip(results["eager"], results["compiled"]):
        assert torch.equal(eager, compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_dispatch_on_cuda_takes_the_kernel_and_groups_the_argsort_rows(monkeypatch):
    indices, weights = routing_case(16384, 6, 64, device="cuda")
    weights = weights.to(torch.bfloat16).requires_grad_()
    counts = expert_counts(indices.flatten(), 64)
    routing = Routing(indices, weights, counts, counts)
    by_kernel = sort_by_expert(torch.zeros(16384, 1, device="cuda"), routing, 64)
    assert by_kernel.offsets is not None, "the kernel path did not run"
    grad_rows = torch.randn(by_kernel.row_weight.shape[0], device="cuda", dtype=torch.bfloat16)
    (grad_kernel,) = torch.autograd.grad((by_kernel.row_weight * grad_rows).sum(), weights)
    monkeypatch.setenv("SLIMMOE_ROUTING_KERNELS", "0")
    by_sort = sort_by_expert(torch.zeros(16384, 1, device="cuda"), routing, 64)
    (grad_sort,) = torch.autograd.grad((by_sort.row_weight * grad_rows).sum(), weights)
    for name in ("row_index", "row_weight", "source_order"):
        assert torch.equal(getattr(by_kernel, name), getattr(by_sort, name)), name
    assert torch.equal(by_kernel.offsets, kernels.offsets_from_counts(counts))
    assert torch.equal(grad_kernel, grad_sort)
