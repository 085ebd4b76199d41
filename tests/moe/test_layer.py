"""MoELayer against the naive per-token loop: outputs and gradients, odd shapes, every k."""

from __future__ import annotations

import copy

import pytest
import torch

import moe
from moe import MoEConfig, MoELayer
from tests.moe.naive import naive_moe

torch.set_default_dtype(torch.float32)


def _layer(seed=0, **overrides) -> MoELayer:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=7, ffn_hidden_size=5, num_experts=5, top_k=2, router_init_std=0.5)
    cfg.update(overrides)
    return MoELayer(MoEConfig(**cfg))


def _clone_params(layer: MoELayer) -> dict:
    experts = layer.experts
    params = {
        "router": layer.router.weight.detach().clone().requires_grad_(layer.router.is_learned),
        "w1": experts.w1.detach().clone().requires_grad_(),
        "w2": experts.w2.detach().clone().requires_grad_(),
        "w3": None if experts.w3 is None else experts.w3.detach().clone().requires_grad_(),
    }
    return params


def _check_against_naive(layer: MoELayer, x: torch.Tensor, k: int, atol=1e-5):
    cfg = layer.config
    moe.set_active_experts(layer, k)
    ref_params = _clone_params(layer)
    x_ours = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    bias = None if layer.router.expert_bias is None else layer.router.expert_bias.clone()

    y = layer(x_ours)
    y_ref, choices = naive_moe(
        x_ref, ref_params["router"], ref_params["w1"], ref_params["w2"], ref_params["w3"], k,
        activation=cfg.activation, score_function=cfg.score_function, normalize=cfg.normalize_topk, bias=bias,
    )
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
    ours_sets = [set(row) for row in layer.last_routing.indices.tolist()]
    assert ours_sets == [set(row) for row in choices]

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=atol, rtol=1e-5)
    if layer.router.is_learned:
        torch.testing.assert_close(layer.router.weight.grad, ref_params["router"].grad, atol=atol, rtol=1e-5)
    for name in ("w1", "w2", "w3"):
        ours = getattr(layer.experts, name)
        if ours is None:
            continue
        torch.testing.assert_close(ours.grad, ref_params[name].grad, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_layer_matches_naive_loop_every_k(k, activation):
    layer = _layer(activation=activation, top_k=min(k, 5))
    _check_against_naive(layer, torch.randn(13, 7), k)


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=8, ffn_hidden_size=12, num_experts=4),  # aligned: F.grouped_mm path
        dict(hidden_size=9, ffn_hidden_size=3, num_experts=7),  # odd: loop path
        dict(hidden_size=16, ffn_hidden_size=20, num_experts=3, expert_backend="loop"),
    ],
)
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize_topk", [True, False])
def test_layer_shapes_scores_backends(shape, score_function, normalize_topk):
    layer = _layer(score_function=score_function, normalize_topk=normalize_topk, **shape)
    _check_against_naive(layer, torch.randn(11, shape["hidden_size"]), 2)


def test_fixed_random_router_gradients_reach_input_only():
    layer = _layer(router="random", router_init_std=0.5)
    assert "router.weight" not in dict(layer.named_parameters())
    _check_against_naive(layer, torch.randn(9, 7), 2)


def test_experts_without_tokens():
    layer = _layer(num_experts=16, hidden_size=8, ffn_hidden_size=8, top_k=1)
    x = torch.randn(3, 8)  # 3 tokens, 16 experts: at least 13 are empty
    _check_against_naive(layer, x, 1)
    assert int((layer.last_routing.tokens_per_expert == 0).sum()) >= 13
    empty = layer.last_routing.tokens_per_expert == 0
    assert torch.all(layer.experts.w1.grad[empty] == 0)


def test_all_tokens_on_one_expert():
    layer = _layer(num_experts=6, hidden_size=8, ffn_hidden_size=8, top_k=1, balance="bias")
    with torch.no_grad():
        layer.router.expert_bias[4] = 10.0  # dominates every score in [0, 1]
    _check_against_naive(layer, torch.randn(21, 8), 1)
    assert layer.last_routing.tokens_per_expert.tolist() == [0, 0, 0, 0, 21, 0]


def test_single_token_and_batched_shape():
    layer = _layer(hidden_size=8, ffn_hidden_size=8)
    _check_against_naive(layer, torch.randn(1, 8), 2)
    x = torch.randn(2, 3, 8)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, layer(x.reshape(6, 8)).reshape(2, 3, 8))


def test_k_equal_to_num_experts_is_dense_softmax_mixture():
    layer = _layer(hidden_size=8, ffn_hidden_size=8, num_experts=4)
    moe.set_active_experts(layer, 4)
    x = torch.randn(5, 8)
    y = layer(x)
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # [T, E]
    experts = layer.experts
    dense = torch.stack(
        [(torch.nn.functional.silu(x @ experts.w1[e]) * (x @ experts.w3[e])) @ experts.w2[e] for e in range(4)], dim=1
    )  # [T, E, d]
    torch.testing.assert_close(y, (probs.unsqueeze(-1) * dense).sum(1), atol=1e-5, rtol=1e-5)


def test_layer_runs_in_bfloat16_and_keeps_router_state_fp32():
    layer = _layer(hidden_size=8, ffn_hidden_size=8, router="random", balance="bias").to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.experts.w1.dtype == torch.bfloat16
    y = layer(torch.randn(6, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_bf16_layer_routes_and_differentiates_the_router_as_the_fp32_layer_does(backend):
    """Under bf16 the router works in fp32 (logits, scores, top-k, gate weights and its gradient,
    as Megatron-core's ``moe_router_dtype="fp32"``) and its learned weight stays fp32 through
    ``.to(torch.bfloat16)``. Against the fp32 layer it was cast from, on the same (bf16) tokens,
    every token picks the same experts and the router's gradient is within 1% (a router weight
    rounded to bf16 sends a few tokens elsewhere, and that alone moves the gradient by several percent)."""
    torch.manual_seed(0)
    reference = MoELayer(MoEConfig(hidden_size=256, ffn_hidden_size=512, num_experts=8, top_k=2, router="learned",
                                   balance="aux_loss", expert_backend=backend))
    layer = copy.deepcopy(reference).to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32 and layer.experts.w1.dtype == torch.bfloat16
    assert isinstance(layer.router.weight, torch.nn.Parameter)
    tokens = torch.randn(4096, 256).to(torch.bfloat16)
    x16, x32 = tokens.clone().requires_grad_(), tokens.float().requires_grad_()
    y16, y32 = layer(x16), reference(x32)
    assert y16.dtype == torch.bfloat16
    grad = torch.randn(4096, 256)
    (y16.float() * grad).sum().backward()
    (y32 * grad).sum().backward()
    assert torch.equal(layer.last_routing.indices, reference.last_routing.indices)
    assert layer.last_routing.weights.dtype == torch.float32
    torch.testing.assert_close(layer.last_routing.weights, reference.last_routing.weights, atol=0, rtol=0)
    g16, g32 = layer.router.weight.grad, reference.router.weight.grad
    assert g16.dtype == torch.float32
    assert float((g16 - g32).norm() / g32.norm()) < 0.01
    assert float((g16 - g32).abs().max()) < 0.01 * float(g32.abs().max())


@pytest.mark.parametrize("num_experts", [6, 300])
def test_sort_by_expert_narrow_keys_and_source_order(num_experts):
    """The dispatcher's grouping equals a stable int64 argsort of the slots (whatever the key dtype), and
    its source_order lists each token's k grouped rows; with capacity dropping there is none."""
    from moe.dispatch import sort_by_expert, sort_keys
    from moe.routers import Routing, expert_counts

    tokens, k = 50, 3
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    counts = expert_counts(indices.flatten(), num_experts)
    rows = sort_by_expert(torch.zeros(tokens, 2), Routing(indices, weights, counts, counts), num_experts)
    order = torch.argsort(indices.flatten(), stable=True)
    assert sort_keys(indices, num_experts).dtype == (torch.uint8 if num_experts < 255 else torch.int16)
    assert torch.equal(rows.row_index, order // k) and torch.equal(rows.row_weight, weights.flatten()[order])
    assert torch.equal(rows.row_index[rows.source_order].view(tokens, k), torch.arange(tokens)[:, None].expand(-1, k))
    assert torch.equal(rows.source_order[order], torch.arange(tokens * k))

    kept = torch.rand(tokens, k, generator=g) > 0.3
    kept_counts = expert_counts(indices.masked_fill(~kept, num_experts).flatten(), num_experts + 1)[:-1]
    dropped = sort_by_expert(torch.zeros(tokens, 2), Routing(indices, weights * kept, kept_counts, counts, kept),
                             num_experts)
    assert dropped.source_order is None and dropped.row_index.shape[0] == int(kept.sum())
    assert torch.equal(dropped.row_index, order[kept.flatten()[order]] // k)
