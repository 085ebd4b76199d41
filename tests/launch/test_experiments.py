"""The balancing experiment's plumbing: its grid of runs, the settings each run trains with, the
MaxVio-over-steps series read back from a run's logs, the plot, and one clear error for a run the
experiment does not have. (Training and tabulating end to end: tests/launch/test_slim.py.)"""

from __future__ import annotations

import json
import math

import pytest

from launch.cli import main
from launch.config import load_run_config
from launch.experiments import (
    BALANCING_MODES,
    BALANCING_RATES,
    BALANCING_STEPS,
    EXPERIMENTS,
    REPO,
    _train_max_vio,
    plot_max_vio,
    run_overrides,
)


def test_the_balancing_grid_trains_each_rule_and_rate_for_the_documented_steps():
    runs = dict(EXPERIMENTS["balancing"])
    grid = [label for label in runs if label.startswith("learned_bias_") and label.split("_")[-1][0].isdigit()]
    assert len(grid) == len(BALANCING_MODES) * len(BALANCING_RATES) == 6
    seen = set()
    for label in grid:
        cfg = load_run_config(REPO / runs[label], run_overrides(label, "cpu", [], "balancing"))
        moe = cfg.model.moe
        assert (cfg.model.moe.router, moe.balance, cfg.train.steps) == ("learned", "bias", BALANCING_STEPS)
        seen.add((moe.bias_update_mode, moe.bias_update_rate))
    assert seen == {(mode, rate) for mode in BALANCING_MODES for rate in BALANCING_RATES}
    # the user's --set comes last and wins; the aux-loss run keeps its own balancing
    cfg = load_run_config(REPO / runs["learned_aux_loss"], run_overrides("learned_aux_loss", "cpu", ["train.steps=7"],
                                                                       "balancing"))
    assert cfg.train.steps == 7 and cfg.model.moe.balance == "aux_loss"
    softmax = load_run_config(REPO / runs["learned_bias_softmax"], run_overrides("learned_bias_softmax", "cpu", [],
                                                                                 "balancing")).model.moe
    assert softmax.score_function == "softmax" and softmax.balance == "bias"


def _write_metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_max_vio_over_steps_is_read_from_the_training_logs_and_plotted(tmp_path):
    with_bias, without = tmp_path / "a", tmp_path / "b"
    _write_metrics(with_bias, [
        {"event": "eval", "step": 0, "val/loss": 5.0},
        {"event": "train", "step": 10, "train/max_vio": 1.5, "bias_range/blocks.0.ffn": 0.1, "bias_range/blocks.1.ffn": 0.3},
        {"event": "train", "step": 20, "train/max_vio": 0.5, "bias_range/blocks.0.ffn": 0.2, "bias_range/blocks.1.ffn": 0.4},
    ])
    _write_metrics(without, [{"event": "train", "step": 10, "train/max_vio": 0.7}])
    assert _train_max_vio(with_bias) == ([10, 20], [1.5, 0.5], [pytest.approx(0.2), pytest.approx(0.3)])
    steps, vio, spread = _train_max_vio(without)
    assert (steps, vio) == ([10], [0.7]) and math.isnan(spread[0])
    assert _train_max_vio(tmp_path / "missing") == ([], [], [])
    png = plot_max_vio({"a": with_bias / "export", "b": without / "export"}, tmp_path / "max_vio.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_run_is_one_clear_error(tmp_path, capsys):
    assert main(["experiment", "balancing", "--out", str(tmp_path), "--runs", "learned_bias_sign_0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown run(s) learned_bias_sign_0.5" in err and "learned_bias_sign_0.001" in err
