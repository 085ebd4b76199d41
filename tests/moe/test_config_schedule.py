"""MoEConfig validation, the k schedule, set_active_experts and the fixed random router."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe
from moe import MoEConfig, MoELayer, k_at_step
from moe.schedules import multistep_levels


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 0, "integer >= 1"),
        ("num_experts", 2.5, "integer >= 1"),
        ("top_k", 9, "top_k <= num_experts"),
        ("router", "hash", "'learned', 'random'"),
        ("score_function", "relu", "'softmax', 'sigmoid'"),
        ("normalize_topk", "yes", "true or false"),
        ("balance", "sinkhorn", "'none', 'aux_loss', 'bias'"),
        ("aux_loss_coeff", -1.0, ">= 0"),
        ("bias_update_rate", float("nan"), "finite"),
        ("bias_update_schedule", "cosine", "'constant', 'inverse_time'"),
        ("bias_update_t0", 0.0, "> 0"),
        ("bias_update_mode", "multiplicative", "'sign', 'proportional'"),
        ("capacity_factor", 0.0, "null for dropless"),
        ("drop_policy", "random", "'probs', 'position'"),
        ("activation", "tanh", "'swiglu', 'gelu', 'relu'"),
        ("router_seed", -1, ">= 0"),
        ("expert_backend", "cuda", "'auto', 'triton', 'torch', 'loop', 'gather'"),
        ("k_schedule", "step", "'constant', 'linear'"),
        ("k_max", 9, "at most num_experts"),
        ("k_min", 0, "integer >= 1"),
    ],
)
def test_bad_values_name_field_value_and_allowed(field, value, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{"num_experts": 8, "top_k": 2, field: value})
    text = str(err.value)
    assert f"MoEConfig.{field}={value!r}" in text
    assert message in text


def test_k_min_above_k_max_is_an_error():
    with pytest.raises(ValueError, match=r"k_min=6 .*k_min <= k_max \(4\)"):
        MoEConfig(num_experts=8, k_schedule="linear", k_min=6, k_max=4)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="unknown key\\(s\\) num_expert"):
        MoEConfig.from_dict({"num_expert": 8})
    cfg = MoEConfig(num_experts=16, top_k=4, router="random", balance="bias", k_schedule="linear", k_min=2)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.k_max == 16  # defaults to E for a growing schedule
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(MoEConfig)}


def _sched(kind, k_min=2, k_max=16, steps=400_000):
    return MoEConfig(num_experts=16, top_k=2, k_schedule=kind, k_min=k_min, k_max=k_max, k_schedule_steps=steps)


@pytest.mark.parametrize(
    "kind, step, expected",
    [
        # linear: clip(round((k_max - k_min) * step / T) + k_min, k_min, k_max)
        ("linear", 0, 2), ("linear", 50_000, 4), ("linear", 200_000, 9), ("linear", 400_000, 16), ("linear", 10**7, 16),
        # cosine: round((k_min - k_max) * cos(pi t / 2T) + k_max)
        ("cosine", 0, 2), ("cosine", 200_000, 6), ("cosine", 400_000, 16),
        # exponential: round(k_min * (k_max / k_min) ** (t / T))
        ("exponential", 0, 2), ("exponential", 200_000, 6), ("exponential", 400_000, 16),
        # multistep over 2, 4, 8, 16 in equal spans
        ("multistep", 0, 2), ("multistep", 133_334, 4), ("multistep", 266_667, 8), ("multistep", 399_999, 8),
        ("multistep", 400_000, 16),
    ],
)
def test_k_schedule_values(kind, step, expected):
    assert k_at_step(_sched(kind), step) == expected


def test_k_schedule_constant_and_levels():
    assert k_at_step(MoEConfig(num_experts=8, top_k=3), 12345) == 3
    assert multistep_levels(1, 16) == [1, 2, 4, 8, 16]
    assert multistep_levels(3, 16) == [3, 6, 12, 16]
    with pytest.raises(ValueError, match="step"):
        k_at_step(_sched("linear"), -1)


def _model(num_layers=3, **cfg):
    base = dict(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=1)
    base.update(cfg)
    return torch.nn.Sequential(*[MoELayer(MoEConfig(**base), layer_idx=i) for i in range(num_layers)])


def test_advance_k_schedule_sets_every_layer():
    model = _model(router="random", k_schedule="linear", k_min=1, k_max=4, k_schedule_steps=30)
    assert [layer.active_experts for layer in model] == [1, 1, 1]
    assert moe.advance_k_schedule(model, 15) == [3, 3, 3]  # round(3 * 0.5) + 1 = 3 (banker's rounding of 1.5 = 2)
    model(torch.randn(5, 8))
    assert all(layer.last_routing.indices.shape == (5, 3) for layer in model)


def test_set_active_experts_int_list_and_errors():
    model = _model()
    moe.set_active_experts(model, 4)
    assert [layer.active_experts for layer in model] == [4, 4, 4]
    moe.set_active_experts(model, [1, 2, 3])
    model(torch.randn(6, 8))
    assert [layer.last_routing.indices.shape[1] for layer in model] == [1, 2, 3]
    for bad in (0, 5, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"expected an integer in 1\.\.4"):
            moe.set_active_experts(model, bad)
    with pytest.raises(ValueError, match="2 values of k for 3 MoE layers"):
        moe.set_active_experts(model, [1, 2])
    with pytest.raises(ValueError, match="k=9 is invalid for MoE layer 1"):
        moe.set_active_experts(model, [1, 9, 1])
    assert [layer.active_experts for layer in model] == [1, 2, 3]  # nothing changed by a failed call
    with pytest.raises(ValueError, match="no MoELayer"):
        moe.set_active_experts(torch.nn.Linear(2, 2), 1)


def test_fixed_random_router_is_seeded_frozen_and_checkpointed():
    a, b = _model(router="random", router_seed=5), _model(router="random", router_seed=5)
    for la, lb in zip(a, b):
        assert torch.equal(la.router.weight, lb.router.weight)  # same on every rank, no communication
    assert not torch.equal(a[0].router.weight, a[1].router.weight)  # distinct per layer
    assert not torch.equal(a[0].router.weight, _model(router="random", router_seed=6)[0].router.weight)
    assert "0.router.weight" in a.state_dict()
    assert not any("router" in name for name, _ in a.named_parameters())

    torch.manual_seed(0)
    model = _model(router="random", balance="bias", top_k=2)
    frozen = [layer.router.weight.clone() for layer in model]
    experts_before = [layer.experts.w1.detach().clone() for layer in model]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bias_moved = [False] * len(model)
    for _ in range(5):
        loss = model(torch.randn(16, 8)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        moe.update_expert_biases(model)
        # (sign steps of exactly +-rate can cancel back to 0, so look at every step, not the end)
        bias_moved = [moved or bool(layer.router.expert_bias.any()) for moved, layer in zip(bias_moved, model)]
    for layer, weight, w1 in zip(model, frozen, experts_before):
        assert torch.equal(layer.router.weight, weight)  # bit-identical
        assert not torch.equal(layer.experts.w1, w1)  # the experts trained
    assert all(bias_moved)
