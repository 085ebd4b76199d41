"""Shared experts (DeepSeekMoE) and Residual-MoE (DeepSpeed-MoE): always active beside the routed
experts at every k, counted in FLOPs and active parameters, saved and loaded with the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moe
from moe import ModelConfig, MoEConfig, MoELayer, MoETransformer


def _layer(**options) -> MoELayer:
    config = dict(hidden_size=16, ffn_hidden_size=12, num_experts=4, top_k=2, router="learned",
                  num_shared_experts=2, shared_ffn_hidden_size=10)
    config.update(options)
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**config))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_layer_adds_a_dense_swiglu_of_the_shared_width_to_the_routed_output_at_any_k(k):
    layer = _layer()
    layer.set_active_experts(k)
    routed_only = copy.deepcopy(layer)
    routed_only.shared_mlp = None
    shared = layer.shared_mlp
    assert tuple(shared.w1.weight.shape) == (2 * 10, 16)  # two shared experts of width 10, as one MLP
    x = torch.randn(3, 5, 16)
    by_hand = F.linear(F.silu(F.linear(x, shared.w1.weight)) * F.linear(x, shared.w3.weight), shared.w2.weight)
    torch.testing.assert_close(layer(x), routed_only(x) + by_hand, rtol=1e-5, atol=1e-6)


def test_shared_experts_get_gradients_and_the_router_does_not_see_them():
    layer = _layer()
    x = torch.randn(7, 16)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.shared_mlp.parameters())
    assert layer.router.weight.shape == (4, 16)  # routes over the routed experts only


def test_no_shared_experts_means_no_shared_mlp_and_the_default_width_is_the_experts():
    assert _layer(num_shared_experts=0).shared_mlp is None
    assert MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=2, top_k=1, num_shared_experts=3).shared_width == 18


@pytest.mark.parametrize("field, value", [("num_shared_experts", -1), ("num_shared_experts", 1.5),
                                          ("shared_ffn_hidden_size", 0)])
def test_bad_shared_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=2, top_k=1, **{field: value})


def _model(**moe_options) -> MoETransformer:
    options = dict(hidden_size=16, ffn_hidden_size=12, num_experts=4, top_k=2, router="learned",
                   num_shared_experts=1, shared_ffn_hidden_size=20)
    options.update(moe_options)
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(num_layers=3, num_heads=2, max_seq_len=32, moe_every=2,
                                      moe=MoEConfig(**options))).eval()


@pytest.mark.parametrize("k", [1, 4])
def test_flops_and_active_parameters_include_the_shared_experts(k):
    from torch.utils.flop_counter import FlopCounterMode

    model = _model()
    moe.set_active_experts(model, k)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, 5)))
    assert 5 * model.flops_per_token(context=0) == counter.get_total_flops()
    shared = sum(p.numel() for block in model.blocks if isinstance(block.ffn, MoELayer)
                 for p in block.ffn.shared_mlp.parameters())
    per_expert = 3 * 16 * 12
    moe_blocks = sum(isinstance(block.ffn, MoELayer) for block in model.blocks)
    without_routed = model.num_parameters() - moe_blocks * 4 * per_expert
    assert shared > 0 and model.num_parameters(active_k=k) == without_routed + moe_blocks * k * per_expert


def test_a_saved_shared_expert_model_loads_and_computes_the_same(tmp_path):
    model = _model()
    moe.save_pretrained(model, tmp_path / "export")
    loaded = moe.load_pretrained(tmp_path / "export", device="cpu")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    assert any(".shared_mlp." in name for name, _ in loaded.named_parameters())


def test_the_residual_moe_config_is_one_shared_expert_and_k_1():
    from launch.config import load_run_config

    cfg = load_run_config("configs/tiny_residual.yaml")
    m = cfg.model.moe
    assert (m.num_shared_experts, m.top_k, m.k_schedule) == (1, 1, "constant")
    model = MoETransformer(cfg.model)
    layer = next(block.ffn for block in model.blocks if isinstance(block.ffn, MoELayer))
    assert layer.shared_mlp is not None and layer.active_experts == 1
