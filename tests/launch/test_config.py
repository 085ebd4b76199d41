"""Run configs: the shipped YAML files, overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.config import apply_override, load_run_config
from moe import MoETransformer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny", "learned_aux", "learned_bias", "gpu_example"])
def test_shipped_configs_load(name):
    cfg = load_run_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.moe.num_experts >= 8 and cfg.train.seq_len <= cfg.model.max_seq_len


def test_tiny_is_smoe_dropout_with_bias_balancing_and_1_to_3m_parameters():
    cfg = load_run_config(CONFIGS / "tiny.yaml")
    moe_cfg = cfg.model.moe
    assert (moe_cfg.router, moe_cfg.balance, moe_cfg.k_schedule) == ("random", "bias", "linear")
    assert moe_cfg.k_min < moe_cfg.k_max == moe_cfg.num_experts == 8 and cfg.model.num_layers == 4
    assert 1_000_000 <= MoETransformer(cfg.model).num_parameters() <= 3_000_000
    aux, bias = load_run_config(CONFIGS / "learned_aux.yaml"), load_run_config(CONFIGS / "learned_bias.yaml")
    assert (aux.model.moe.router, aux.model.moe.balance) == ("learned", "aux_loss")
    assert (bias.model.moe.router, bias.model.moe.balance, bias.model.moe.score_function) == ("learned", "bias", "sigmoid")
    assert MoETransformer(aux.model).num_parameters() == MoETransformer(bias.model).num_parameters()


def test_overrides_reach_any_depth_and_are_typed():
    cfg = load_run_config(CONFIGS / "tiny.yaml", ["train.lr=1e-4", "model.moe.num_experts=16", "model.moe.k_max=16",
                                                  "data.path=/tmp/x", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 1e-4 and cfg.model.moe.num_experts == 16 and cfg.data.path == "/tmp/x"
    assert cfg.train.betas == (0.8, 0.9)
    values = {"a": {"b": 1}}
    apply_override(values, "a.c.d=null")
    assert values == {"a": {"b": 1, "c": {"d": None}}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.learning_rate=1"], "train: unknown key\\(s\\) learning_rate"),
        (["model.moe.k_max=9"], "MoEConfig.k_max=9 is invalid: expected at most num_experts \\(8\\)"),
        (["model.layers=2"], "model: unknown key\\(s\\) layers"),
        (["trainer.steps=2"], "unknown top-level key\\(s\\) trainer"),
        (["train.seq_len=512"], "train.seq_len=512 is invalid: at most model.max_seq_len \\(128\\)"),
        (["train.steps=0"], "train.steps=0 is invalid"),
        (["deepspeed.train_batch_size=8"], "deepspeed.train_batch_size is set by the trainer"),
        (["train.lr"], "expected section.key=value"),
        (["train.lr.x=1"], "'lr' is not a section"),
        (["model.moe="], "missing key 'model.moe'"),
        (["train.grad_clip=-1"], "train.grad_clip=-1 is invalid"),
        (["train.precision=fp16"], "train.precision='fp16' is invalid"),
        (["deepspeed.zero_optimization.stage=3"], "zero_optimization.stage=3 is invalid: expected 0, 1 or 2"),
        (["deepspeed.bf16.enabled=true"], "deepspeed.bf16 is set by the trainer from train.precision"),
    ],
)
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(CONFIGS / "tiny.yaml", overrides)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_run_config(bad)


def test_a_file_without_the_model_or_train_section_is_an_error(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("model:\n  num_layers: 2\n  moe: {num_experts: 4}\n")
    with pytest.raises(ValueError, match="missing key 'train'"):
        load_run_config(partial)
