"""Bias balancing, auxiliary losses and capacity: formulas and behaviour."""

from __future__ import annotations

import math

import pytest
import torch

import moe
from moe import MoEConfig, MoELayer
from moe.balance import (
    capacity_keep_mask,
    expert_capacity,
    router_z_loss,
    switch_aux_loss,
    updated_expert_bias,
)
from tests.moe.naive import naive_moe


# ---------------------------------------------------------------- the bias rule


def test_bias_rule_matches_formula_elementwise():
    bias = torch.tensor([0.5, -0.25, 0.0, 0.125, 0.0])
    counts = torch.tensor([10, 2, 6, 6, 1])  # mean 5: over, under, over, over, under
    new = updated_expert_bias(bias, counts, rate=0.01)
    mean = sum(counts.tolist()) / 5
    expected = [b + 0.01 * (1 if mean > c else -1 if mean < c else 0) for b, c in zip(bias.tolist(), counts.tolist())]
    assert new.dtype == torch.float32
    torch.testing.assert_close(new, torch.tensor(expected), rtol=0, atol=0)


def test_bias_rule_sign_zero_at_mean_and_proportional_mode():
    counts = torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4]])  # [L, E]; row 0 perfectly balanced
    bias = torch.zeros(2, 4)
    assert torch.equal(updated_expert_bias(bias, counts, 0.1)[0], torch.zeros(4))
    prop = updated_expert_bias(bias, counts, 0.1, mode="proportional")
    torch.testing.assert_close(prop[1], 0.1 * (4.0 - counts[1].float()) / 4.0)
    with pytest.raises(ValueError, match="mode"):
        updated_expert_bias(bias, counts, 0.1, mode="median")


def _skewed_stream(num_tokens, hidden, direction, generator):
    """Tokens clustered around one direction, so an unbalanced router favours a few experts."""
    noise = torch.randn(num_tokens, hidden, generator=generator)
    return 3.0 * direction + noise


@pytest.mark.parametrize("router", ["learned", "random"])
def test_bias_balancing_brings_max_vio_below_0_2(router):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=4, num_experts=8, top_k=2, router=router,
                    balance="bias", bias_update_rate=2e-3, router_init_std=0.1, router_seed=3)
    layer = MoELayer(cfg)
    gen = torch.Generator().manual_seed(1)
    direction = layer.router.weight[0].detach() / layer.router.weight[0].norm()

    def max_vio_now():
        layer.eval()
        with torch.no_grad():
            layer(_skewed_stream(4096, 32, direction, gen))
        layer.train()
        return moe.max_violation(layer.last_routing.routed_per_expert)

    start = max_vio_now()
    assert start > 1.0, f"the stream is not skewed enough to test balancing (MaxVio {start:.2f})"
    history = []
    for _ in range(400):  # bounded number of bias updates
        layer(_skewed_stream(512, 32, direction, gen))
        moe.update_expert_biases(layer)
        history.append(max_vio_now())
        if history[-1] < 0.2:
            break
    assert history[-1] < 0.2, f"MaxVio {start:.2f} -> {history[-1]:.2f} after {len(history)} updates"
    assert int(layer.router.bias_updates) == len(history)


def test_counts_accumulate_in_training_mode_only_and_reset():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, balance="bias"))
    x1, x2 = torch.randn(10, 8), torch.randn(6, 8)
    layer.train()
    layer(x1)
    first = layer.last_routing.routed_per_expert.clone()
    layer(x2)  # a second micro-batch
    second = layer.last_routing.routed_per_expert.clone()
    layer.eval()
    layer(torch.randn(50, 8))  # evaluation does not count
    layer.train()
    with torch.no_grad():
        layer(torch.randn(50, 8))  # nor does a no-grad forward
    assert torch.equal(layer.router.pending_tokens, first + second)
    assert int(layer.router.pending_tokens.sum()) == (10 + 6) * 2
    bias_before = layer.router.expert_bias.clone()
    counts = moe.update_expert_biases(layer)
    assert torch.equal(counts[0], first + second)
    torch.testing.assert_close(layer.router.expert_bias, updated_expert_bias(bias_before, first + second, 1e-3))
    assert int(layer.router.pending_tokens.sum()) == 0


def test_inverse_time_rate_schedule():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=2, top_k=1, balance="bias",
                    bias_update_rate=0.1, bias_update_schedule="inverse_time", bias_update_t0=2.0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    x = torch.zeros(4, 8)
    x[:, 0] = 5.0  # every token picks expert 0
    steps = []
    for _ in range(3):
        before = layer.router.expert_bias.clone()
        layer(x)
        moe.update_expert_biases(layer)
        steps.append(float(before[0] - layer.router.expert_bias[0]))
    expected = [0.1 / (1 + t / 2.0) for t in range(3)]
    assert steps == pytest.approx(expected, rel=1e-5)


def test_an_update_without_tokens_changes_nothing():
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, balance="bias"))
    layer.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    counts = moe.update_expert_biases(layer)  # no training forward since the last update
    assert int(counts.sum()) == 0
    assert torch.equal(layer.router.expert_bias, torch.tensor([0.1, -0.2, 0.0, 0.3]))
    assert int(layer.router.bias_updates) == 0


def test_bias_only_steers_selection_not_weights():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=6, top_k=2, balance="bias",
                               score_function="sigmoid", router_init_std=0.5))
    x = torch.randn(16, 8)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, -0.7]))
    layer(x)
    routing = layer.last_routing
    scores = torch.sigmoid(x @ layer.router.weight.T)
    expected = scores.gather(1, routing.indices)
    torch.testing.assert_close(routing.weights, expected / expected.sum(-1, keepdim=True))
    assert (routing.indices == 4).any(dim=1).all()  # the +0.7 expert is always chosen
    assert not (routing.indices == 5).any()


# ---------------------------------------------------------------- auxiliary losses


def test_switch_aux_loss_formula_and_gradient():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, balance="aux_loss",
                    aux_loss_coeff=0.5, z_loss_coeff=0.1, router_init_std=0.5)
    layer = MoELayer(cfg).train()
    x = torch.randn(12, 8)
    layer(x)
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
    counts = layer.last_routing.routed_per_expert
    f = [counts[i].item() / (12 * 2) for i in range(4)]
    p = [probs[:, i].mean().item() for i in range(4)]
    aux = 4 * sum(fi * pi for fi, pi in zip(f, p))
    z = (torch.logsumexp(x @ layer.router.weight.T, -1) ** 2).mean().item()
    total = moe.collect_aux_losses(layer)
    assert total.item() == pytest.approx(0.5 * aux + 0.1 * z, rel=1e-5)
    total.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_for_uniform_router():
    probs = torch.full((8, 4), 0.25)
    counts = torch.tensor([4, 4, 4, 4])  # 8 tokens * k=2
    assert switch_aux_loss(probs, counts, top_k=2).item() == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_no_aux_loss_in_eval_or_when_disabled():
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, balance="aux_loss"))
    layer.eval()
    layer(torch.randn(4, 8))
    assert layer.aux_loss() is None
    plain = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2)).train()
    plain(torch.randn(4, 8))
    assert plain.aux_loss() is None and moe.collect_aux_losses(plain) is None


# ---------------------------------------------------------------- capacity


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_drop_counts_match_capacity_formula(policy, capacity_factor):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, capacity_factor=capacity_factor,
                    drop_policy=policy, router_init_std=1.0)
    layer = MoELayer(cfg)
    x = torch.randn(37, 8) + 2.0  # skewed so that some experts overflow
    layer(x)
    routing = layer.last_routing
    capacity = math.ceil(37 * 2 / 4 * capacity_factor)
    assert capacity == expert_capacity(37, 2, 4, capacity_factor)
    demand = routing.routed_per_expert
    assert torch.equal(routing.tokens_per_expert, demand.clamp(max=capacity))
    assert routing.num_dropped == int((demand - capacity).clamp(min=0).sum())
    assert routing.dropped_fraction == pytest.approx(routing.num_dropped / (37 * 2))
    assert (routing.weights[~routing.kept] == 0).all()


def test_drop_policies_keep_the_right_tokens():
    indices = torch.tensor([[0], [0], [0], [0], [1]])  # 4 tokens want expert 0
    weights = torch.tensor([[0.1], [0.9], [0.3], [0.8], [1.0]])
    by_position = capacity_keep_mask(indices, weights, 2, capacity=2, policy="position")
    by_probs = capacity_keep_mask(indices, weights, 2, capacity=2, policy="probs")
    assert by_position.flatten().tolist() == [True, True, False, False, True]
    assert by_probs.flatten().tolist() == [False, True, False, True, True]


def test_dropped_choices_leave_output_like_naive_loop_with_mask():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, capacity_factor=0.75,
                    router_init_std=1.0)
    layer = MoELayer(cfg)
    x = torch.randn(20, 8) + 1.0
    y = layer(x)
    routing = layer.last_routing
    assert routing.num_dropped > 0
    experts = layer.experts
    # Reference: naive loop without renormalisation changes, skipping dropped choices.
    y_ref, _ = naive_moe(x, layer.router.weight, experts.w1, experts.w2, experts.w3, 2, kept=routing.kept)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
