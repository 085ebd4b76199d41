"""MFU: model FLOPs of training per token, times tokens/s, over the devices' peak dense bf16 FLOP/s."""

from __future__ import annotations

import types

import pytest
import torch

from launch import train
from launch.config import load_run_config
from moe import MoETransformer, set_active_experts
from moe.devices import dense_bf16_peak_flops
from tests.runs import TINY


def test_training_flops_per_token_follow_the_formula():
    """3 x forward: 2 per multiply-add of every weight a token uses (attention projections, router,
    k experts of each MoE layer, LM head) plus attention over the sequence, 4 * d * S per layer."""
    cfg = load_run_config(TINY).model
    model = MoETransformer(cfg)
    d, f, E, L, S = cfg.hidden_size, cfg.moe.ffn_hidden_size, cfg.moe.num_experts, cfg.num_layers, 128
    for k in (1, 2, 8):
        set_active_experts(model, k)
        matmul_weights = L * (4 * d * d + d * E + k * 3 * d * f) + cfg.vocab_size * d
        assert train.train_flops_per_token(model, S) == 3 * (2 * matmul_weights + L * 4 * d * S)


def test_mfu_is_model_flops_per_second_over_the_peak(monkeypatch):
    cfg = load_run_config(TINY, ["model.num_layers=1"]).model
    model = MoETransformer(cfg)
    layers = dict((name, layer) for name, layer in model.named_modules() if type(layer).__name__ == "MoELayer")
    meter = types.SimpleNamespace(stacked_load=lambda: torch.ones(1, 8, dtype=torch.float64), dropped=0,
                                  assignments=8, reset=lambda: None,
                                  per_layer=lambda stacked: dict(zip(layers, stacked)))
    monkeypatch.setattr("moe.devices.collective_device", lambda group=None: torch.device("cpu"))  # a group of one
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: tensor)
    window = train._new_window(torch.device("cpu"))
    window.update(micro=1, steps=4, seconds=2.0, model_flops=6e14)
    window["sums"][0] = 1.0
    engine = types.SimpleNamespace(module=model, get_global_grad_norm=lambda: 1.0, get_lr=lambda: [1e-3])
    recorded = {}
    logs = types.SimpleNamespace(record=lambda event, step, scalars: recorded.update(scalars))
    postfix = train._log_train(logs, engine, window, meter, layers, [2], 4, 1000, lambda load: 0.0,
                               peak_flops=989.4e12)
    assert recorded["train/mfu"] == pytest.approx(6e14 / 2.0 / 989.4e12)
    assert postfix["MFU"] == f"{100 * 6e14 / 2.0 / 989.4e12:.1f}%"
    window = train._new_window(torch.device("cpu"))
    window.update(micro=1, steps=4, seconds=2.0, model_flops=6e14)
    recorded.clear()
    assert "MFU" not in train._log_train(logs, engine, window, meter, layers, [2], 4, 1000, lambda load: 0.0)
    assert "train/mfu" not in recorded  # no peak (CPU, or a GPU the table lacks): no MFU


def test_peak_table_and_override():
    assert dense_bf16_peak_flops("NVIDIA H100 80GB HBM3", {}) == 989.4e12
    assert dense_bf16_peak_flops("NVIDIA H100 PCIe", {}) == 756e12
    assert dense_bf16_peak_flops("NVIDIA H200", {}) == 989.4e12
    assert dense_bf16_peak_flops("NVIDIA A100-SXM4-80GB", {}) == 312e12
    assert dense_bf16_peak_flops("Some Future GPU", {}) is None
    assert dense_bf16_peak_flops("Some Future GPU", {"SLIMMOE_PEAK_TFLOPS": "1500"}) == 1500e12
    from moe.errors import UserError

    with pytest.raises(UserError, match="SLIMMOE_PEAK_TFLOPS"):
        dense_bf16_peak_flops("NVIDIA H100", {"SLIMMOE_PEAK_TFLOPS": "fast"})
