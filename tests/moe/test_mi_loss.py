"""ModuleFormer's mutual-information router loss: the formula against the paper's definition, its
extremes, the layer's use of it (value, gradient, training behaviour), config validation, eval."""

from __future__ import annotations

import math

import pytest
import torch

import moe
from moe import MoEConfig, MoELayer
from moe.balance import mutual_information_loss


def naive_mi_loss(probs) -> float:
    """The paper's L_MI = sum_m p(m) log p(m) - 1/|X| sum_x sum_m g(m|x) log g(m|x), with
    p(m) = 1/|X| sum_x g(m|x): Python loops over tokens and experts, float64, 0 log 0 = 0."""
    rows = [[float(v) for v in row] for row in probs.tolist()]
    num_tokens, num_experts = len(rows), len(rows[0])

    def plogp(p):
        return p * math.log(p) if p > 0 else 0.0

    marginal = [sum(rows[t][m] for t in range(num_tokens)) / num_tokens for m in range(num_experts)]
    neg_marginal_entropy = sum(plogp(marginal[m]) for m in range(num_experts))  # -H(m)
    conditional_entropy = 0.0  # H(m|x)
    for t in range(num_tokens):
        conditional_entropy -= sum(plogp(rows[t][m]) for m in range(num_experts)) / num_tokens
    return neg_marginal_entropy + conditional_entropy


def _cfg(**overrides) -> MoEConfig:
    values = dict(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, mi_loss_coeff=0.5, router_init_std=0.5)
    values.update(overrides)
    return MoEConfig(**values)


# ---------------------------------------------------------------- the formula


@pytest.mark.parametrize("num_tokens, num_experts", [(1, 2), (13, 5), (64, 8), (7, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_naive_definition_on_random_probs(num_tokens, num_experts, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts)
    logits = 2.0 * torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    expected = naive_mi_loss(probs)
    got = mutual_information_loss(probs.to(dtype))
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert got.item() == pytest.approx(expected, abs=tol)


def test_matches_naive_definition_with_exact_zeros():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.0, 0.8], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert mutual_information_loss(probs).item() == pytest.approx(naive_mi_loss(probs), abs=1e-12)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_extremes(num_experts):
    log_e = math.log(num_experts)
    tokens = 4 * num_experts
    uniform = torch.full((tokens, num_experts), 1.0 / num_experts)  # H(m) = H(m|x) = log E
    assert mutual_information_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.nn.functional.one_hot(torch.arange(tokens) % num_experts, num_experts).float()
    assert mutual_information_loss(spread).item() == pytest.approx(-log_e, abs=1e-6)  # MI = log E, the minimum
    collapsed = torch.nn.functional.one_hot(torch.zeros(tokens, dtype=torch.int64), num_experts).float()
    assert mutual_information_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)  # H(m) = H(m|x) = 0
    gen = torch.Generator().manual_seed(num_experts)
    for _ in range(20):  # anything else lies in [-log E, 0]
        probs = torch.softmax(3.0 * torch.randn(tokens, num_experts, generator=gen), dim=-1)
        value = mutual_information_loss(probs).item()
        assert -log_e - 1e-6 <= value <= 1e-6


def test_empty_batch_and_underflowed_probs_give_finite_values_and_gradients():
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = mutual_information_loss(empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(empty.grad, torch.zeros(0, 4))
    logits = torch.tensor([[200.0, 0.0, -200.0], [0.0, 0.0, 0.0]], requires_grad=True)  # exp underflows to 0
    loss = mutual_information_loss(torch.softmax(logits, dim=-1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- in the layer


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_layer_loss_value_and_router_gradient_match_direct_computation(score_function):
    torch.manual_seed(0)
    layer = MoELayer(_cfg(score_function=score_function)).train()
    x = torch.randn(24, 8)
    layer(x)
    routing = layer.last_routing
    assert routing.aux_loss is None and routing.z_loss is None and routing.mi_loss is not None
    assert not routing.mi_loss.requires_grad  # last_routing is detached

    weight = layer.router.weight.detach().clone().requires_grad_(True)
    logits = x @ weight.T
    if score_function == "softmax":
        probs = torch.softmax(logits, dim=-1)
    else:  # sigmoid scores normalised into a distribution per token
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    expected = 0.5 * naive_mi_loss(probs.detach().double())
    loss = layer.aux_loss()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert moe.collect_aux_losses(layer).item() == pytest.approx(expected, abs=1e-6)

    loss.backward()
    (0.5 * mutual_information_loss(probs)).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.router.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)
    assert layer.experts.w1.grad is None  # a router loss: the experts get no gradient from it


def test_summed_with_switch_aux_and_z_loss_and_with_bias_balancing():
    torch.manual_seed(0)
    layer = MoELayer(_cfg(balance="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01)).train()
    layer(torch.randn(16, 8))
    r = layer.last_routing
    assert None not in (r.aux_loss, r.z_loss, r.mi_loss)
    assert layer.aux_loss().item() == pytest.approx((r.aux_loss + r.z_loss + r.mi_loss).item(), rel=1e-6)

    biased = MoELayer(_cfg(balance="bias")).train()
    with torch.no_grad():
        biased.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # steers selection only
    x = torch.randn(16, 8)
    biased(x)
    probs = torch.softmax(x @ biased.router.weight.T, dim=-1)  # the loss sees the unbiased scores
    assert biased.aux_loss().item() == pytest.approx(0.5 * naive_mi_loss(probs.detach().double()), abs=1e-6)
    assert (biased.last_routing.indices == 2).any(dim=1).all()


def _skewed_stream(num_tokens, hidden, direction, generator):
    """Tokens clustered around one direction, so the initial router favours a few experts."""
    return 3.0 * direction + torch.randn(num_tokens, hidden, generator=generator)


def test_training_on_the_loss_alone_concentrates_tokens_and_balances_load():
    torch.manual_seed(0)
    hidden = 16
    cfg = MoEConfig(hidden_size=hidden, ffn_hidden_size=4, num_experts=8, top_k=2, mi_loss_coeff=1.0,
                    router_init_std=0.1)
    layer = MoELayer(cfg).train()
    optimizer = torch.optim.Adam([layer.router.weight], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    direction = layer.router.weight[0].detach() / layer.router.weight[0].detach().norm()
    held_out = _skewed_stream(4096, hidden, direction, gen)

    def measure():
        with torch.no_grad():
            probs = torch.softmax(held_out @ layer.router.weight.T, dim=-1)
            conditional_entropy = -(probs * probs.log()).sum(-1).mean().item()
            layer.eval()
            layer(held_out)
            layer.train()
        return conditional_entropy, moe.max_violation(layer.last_routing.routed_per_expert)

    start_entropy, start_vio = measure()
    assert start_vio > 1.0, f"the stream is not skewed enough to test balancing (MaxVio {start_vio:.2f})"
    assert start_entropy > 0.8 * math.log(8)
    for _ in range(60):
        layer(_skewed_stream(512, hidden, direction, gen))
        loss = layer.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    entropy, vio = measure()
    assert entropy < 0.5 * start_entropy, f"H(m|x) {start_entropy:.3f} -> {entropy:.3f}"
    assert vio < 0.25, f"MaxVio {start_vio:.2f} -> {vio:.2f}"


# ---------------------------------------------------------------- config and modes


@pytest.mark.parametrize("value, message", [(-0.1, ">= 0"), (float("nan"), "finite"), ("0.1", "finite number")])
def test_bad_coefficient_names_the_field(value, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(mi_loss_coeff=value)
    assert f"MoEConfig.mi_loss_coeff={value!r}" in str(err.value) and message in str(err.value)


def test_nonzero_coefficient_with_fixed_random_router_is_an_error():
    with pytest.raises(ValueError, match=r"MoEConfig\.mi_loss_coeff=0\.01 is invalid: .*router='random'"):
        MoEConfig(router="random", balance="bias", mi_loss_coeff=0.01)
    assert MoEConfig(router="random", mi_loss_coeff=0.0).mi_loss_coeff == 0.0


def test_config_default_from_dict_and_combinations():
    assert MoEConfig().mi_loss_coeff == 0.0
    cfg = MoEConfig.from_dict({"mi_loss_coeff": 0.01, "balance": "aux_loss", "z_loss_coeff": 1e-3})
    assert cfg.mi_loss_coeff == 0.01 and cfg.to_dict()["mi_loss_coeff"] == 0.01
    assert MoEConfig(balance="bias", mi_loss_coeff=1).mi_loss_coeff == 1


def test_no_loss_in_eval_mode_or_when_disabled():
    layer = MoELayer(_cfg()).eval()
    layer(torch.randn(6, 8))
    assert layer.last_routing.mi_loss is None and layer.aux_loss() is None
    layer.train()
    layer(torch.randn(6, 8))
    assert layer.aux_loss() is not None
    off = MoELayer(_cfg(mi_loss_coeff=0.0)).train()
    off(torch.randn(6, 8))
    assert off.last_routing.mi_loss is None and off.aux_loss() is None
