"""PR-MoE (DeepSpeed-MoE's pyramid): one expert count per MoE block. Each block routes over its
own E, k is capped at each block's E, and bias balancing, load metrics, FLOPs, parameter counts,
export and quantization's targets follow each block's own E."""

from __future__ import annotations

import pytest
import torch

import moe
from moe import LoadMeter, ModelConfig, MoEConfig, MoELayer, MoETransformer
from moe.balance import updated_expert_bias
from moe.errors import UserError

PYRAMID = [2, 4, 4, 6]


def _moe_config(**options) -> MoEConfig:
    values = dict(hidden_size=16, ffn_hidden_size=12, num_experts=PYRAMID, top_k=3, router="random", balance="bias")
    values.update(options)
    return MoEConfig(**values)


def _model(**options) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(num_layers=4, num_heads=2, max_seq_len=32, moe=_moe_config(**options)))


def _layers(model) -> list[MoELayer]:
    return [block.ffn for block in model.blocks]


def test_each_block_has_its_own_experts_and_router_and_k_capped_at_its_e():
    model = _model()
    for layer, experts in zip(_layers(model), PYRAMID):
        assert layer.num_experts == experts and layer.experts.w1.shape[0] == experts
        assert layer.router.weight.shape == (experts, 16) and layer.router.expert_bias.shape == (experts,)
        assert layer.active_experts == min(3, experts)
    assert model(torch.randint(0, 256, (2, 7))).shape == (2, 7, 256)


def test_the_list_must_match_the_moe_blocks_and_hold_positive_integers():
    with pytest.raises(ValueError, match="expected one count per MoE block: 2"):
        ModelConfig(num_layers=4, num_heads=2, moe_every=2, moe=_moe_config())
    ModelConfig(num_layers=4, num_heads=2, moe_every=2, moe=_moe_config(num_experts=[2, 6]))  # 2 MoE blocks
    for bad in ([], [4, 0], [4, 2.5], [True, 4]):
        with pytest.raises(ValueError, match="num_experts"):
            _moe_config(num_experts=bad)
    with pytest.raises(ValueError, match="top_k"):
        _moe_config(top_k=7)  # above every block's E
    assert MoEConfig.from_dict(_moe_config().to_dict()).num_experts == PYRAMID  # YAML / JSON round trip


def test_a_growing_k_schedule_runs_each_block_up_to_its_own_e():
    model = _model(k_schedule="linear", k_min=1, k_schedule_steps=10)  # k_max defaults to the largest E
    assert model.config.moe.k_max == 6
    assert [layer.config.k_max for layer in _layers(model)] == [2, 4, 4, 6]
    assert moe.advance_k_schedule(model, 10) == [2, 4, 4, 6]


def test_one_k_is_capped_per_block_and_a_list_is_checked_per_block():
    model = _model()
    moe.set_active_experts(model, 5)
    assert [layer.active_experts for layer in _layers(model)] == [2, 4, 4, 5]
    with pytest.raises(UserError, match="1..6"):
        moe.set_active_experts(model, 7)
    with pytest.raises(UserError, match="MoE layer 0"):
        moe.set_active_experts(model, [3, 1, 1, 1])
    moe.set_active_experts(model, [1, 4, 2, 6])
    assert [layer.active_experts for layer in _layers(model)] == [1, 4, 2, 6]


def test_bias_balancing_and_load_metrics_keep_each_blocks_e():
    model = _model().train()
    meter = LoadMeter(model)
    biases = [layer.router.expert_bias.clone() for layer in _layers(model)]
    model(torch.randint(0, 256, (3, 9)))
    meter.update()
    pending = [layer.router.pending_tokens.clone() for layer in _layers(model)]
    counts = moe.update_expert_biases(model)
    assert counts.shape == (4, 6)
    for layer, before, tokens, row, experts in zip(_layers(model), biases, pending, counts, PYRAMID):
        assert torch.equal(row[:experts], tokens) and not row[experts:].any()
        torch.testing.assert_close(layer.router.expert_bias, updated_expert_bias(before, tokens, 1e-3))
    loads = meter.per_layer(meter.stacked_load())
    assert [load.numel() for load in loads.values()] == PYRAMID
    assert all(int(load.sum()) == 27 * layer.active_experts for load, layer in zip(loads.values(), _layers(model)))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_flops_and_active_parameters_count_each_blocks_experts(k):
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(router="learned", balance="none").eval()
    moe.set_active_experts(model, k)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, 5)))
    assert 5 * model.flops_per_token(context=0) == counter.get_total_flops()
    per_expert = 3 * 16 * 12
    routed = sum(PYRAMID) * per_expert
    active = sum(min(k, e) for e in PYRAMID) * per_expert
    assert model.num_parameters(active_k=k) == model.num_parameters() - routed + active


def test_a_pyramid_saves_and_loads_with_its_ks(tmp_path):
    model = _model().eval()
    moe.set_active_experts(model, [1, 3, 4, 5])
    moe.save_pretrained(model, tmp_path / "export")
    loaded = moe.load_pretrained(tmp_path / "export", device="cpu")
    assert loaded.config.moe.num_experts == PYRAMID
    assert [layer.active_experts for layer in _layers(loaded)] == [1, 3, 4, 5]
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_quantization_targets_each_blocks_experts():
    from moe.quant.calibrate import stage_targets

    config = ModelConfig(num_layers=4, num_heads=2, max_seq_len=32, moe=_moe_config())
    for layer_idx, experts in enumerate(PYRAMID):
        targets = stage_targets(config, layer_idx, 2)
        assert sorted({t.expert for t in targets}) == list(range(experts))
