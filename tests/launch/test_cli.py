"""The `moe` command line: help, the demo, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(name in out.stdout for name in ("train", "eval", "export", "config", "demo", "bench"))


def test_demo_trains_and_prints_routing_statistics(capsys):
    assert main(["demo", "--steps", "8", "--tokens", "64", "--experts", "4", "--hidden-size", "16",
                 "--ffn-hidden-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "held-out MSE" in out and "MaxVio" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) >= 4]
    assert [int(r[0]) for r in rows[-4:]] == [1, 2, 3, 4]  # the self-slimming sweep over k = 1..E
    assert float(rows[-1][2]) == pytest.approx(0.0, abs=1e-9)  # at k = E every expert sees every token


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["demo", "--steps", "2", "--experts", "4", "--k-max", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MoEConfig.k_max=9" in err[0] and "at most num_experts (4)" in err[0]


def test_config_command_prints_parameter_counts_of_the_built_model(capsys):
    from launch.config import load_run_config
    from moe import MoETransformer

    assert main(["config", "configs/tiny.yaml", "--set", "model.num_layers=2"]) == 0
    out = capsys.readouterr().out
    model = MoETransformer(load_run_config("configs/tiny.yaml", ["model.num_layers=2"]).model)
    assert f"parameters: {model.num_parameters():,} total" in out
    assert f"parameters: {model.num_parameters(active_k=2):,} active per token at k=2" in out
    assert "num_layers: 2" in out
    assert main(["config", "configs/missing.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
