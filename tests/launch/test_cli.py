"""The `moe` command line: help, the demo, and one-line errors for bad input."""

from __future__ import annotations

import argparse
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


def test_generate_command_continues_the_prompt_at_the_chosen_k(tmp_path, capsys):
    import torch

    import moe
    from moe import ModelConfig, MoEConfig, MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(num_layers=2, num_heads=2, max_seq_len=32,
                                       moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)))
    moe.save_pretrained(model, tmp_path / "model")
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", "ab", "--max-new-tokens", "5", "--temperature", "0"]
    assert main([*args, "--experts", "1"]) == 0
    out = capsys.readouterr().out
    expected = bytes(model.generate(torch.tensor([[97, 98]]), 5, active_experts=1, temperature=0)[0].tolist())
    assert out.startswith(expected.decode("utf-8", errors="replace") + "\n")
    assert "5 bytes at k=1 of 4 experts" in out
    assert main([*args, "--experts", "9"]) == 2
    assert "expected an integer in 1..4" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_gpu_scale_experiments_resolve_to_valid_configs():
    """`moe experiment NAME --scale gpu`: every run's config validates at the documented size, the
    runs of one experiment differ only in routing, and SMoE-Dropout's k spans all experts."""
    import torch

    from launch.config import load_run_config
    from launch.experiments import EXPERIMENTS, run_overrides
    from moe import MoETransformer

    for runs in EXPERIMENTS.values():
        shapes = set()
        for label, config in runs:
            cfg = load_run_config(config, run_overrides(label, "gpu", ["train.seed=3"]))
            m = cfg.model
            assert (m.num_layers, m.hidden_size, m.moe.num_experts, cfg.train.seq_len, cfg.train.steps) == (12, 768, 16, 1024, 20000)
            assert cfg.train.seed == 3  # the user's --set wins
            if label == "smoe_dropout":
                assert (m.moe.k_min, m.moe.k_max, m.moe.k_schedule_steps) == (2, 16, 20000)
            with torch.device("meta"):
                shapes.add(MoETransformer(m).num_parameters() // 10**6)
        assert len(shapes) <= 2 and min(shapes) >= 368  # learned routers add only E x d per layer
    assert run_overrides("smoe_dropout", "cpu", ["a=1"]) == ["a=1"]


def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch):
    """A ValueError raised inside a dependency (or any other internal failure) is not printed as a
    user's mistake with exit status 2: it propagates with its traceback. A UserError still is one
    line and status 2."""
    import launch.demo as demo
    from moe.errors import UserError

    def internal_failure(args):
        raise ValueError("math domain error")  # as a library raises it, deep inside a run

    monkeypatch.setattr(demo, "run", internal_failure)
    with pytest.raises(ValueError, match="math domain error"):
        main(["demo", "--steps", "1"])
    result = subprocess.run([sys.executable, "-c", "import launch.demo as d, launch.cli as c\n"
                             "d.run = lambda a: (_ for _ in ()).throw(ValueError('inside a dependency'))\n"
                             "raise SystemExit(c.main(['demo']))"], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "ValueError: inside a dependency" in result.stderr and "moe demo: error" not in result.stderr

    def user_mistake(args):
        raise UserError("--steps must be >= 1")

    monkeypatch.setattr(demo, "run", user_mistake)
    assert main(["demo"]) == 2


def test_moe_help_imports_no_heavy_package():
    """`moe --help` lists every command without importing any command's module (nor torch,
    deepspeed or ray, whose imports took seconds), and `moe NAME` imports NAME's module alone."""
    probe = ("import sys\nfrom launch import cli\n"
             "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('torch', 'deepspeed', 'ray', 'launch.train', 'launch.quantize', "
             "'launch.evaluate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, check=True)
    assert "LOADED []" in result.stdout, result.stdout
    assert all(name in result.stdout for name in ("train", "eval", "quantize", "bench", "experiment"))
    result = subprocess.run([sys.executable, "-c", probe, "export", "--help"], capture_output=True, text=True,
                            check=True)
    loaded = result.stdout.split("LOADED")[-1]
    assert "launch.train" not in loaded and "launch.quantize" not in loaded, loaded


def test_the_light_command_list_says_what_each_command_module_says():
    from launch.cli import COMMANDS, build_parser

    full = build_parser()
    subparsers = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert helps == {name: help_text for name, (_, help_text) in COMMANDS.items()}
