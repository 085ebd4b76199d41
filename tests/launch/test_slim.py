"""`moe slim`: the sweep writes its table and plot; budgets pick the largest k that fits;
`moe generate --experts auto` uses the saved sweep."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import moe
from launch.cli import main
from launch.slim import default_ks, parse_ks, pick_k
from moe import ModelConfig, MoEConfig, MoETransformer

ROWS = [  # a given measurement
    {"k": 1, "decode_ms_per_token": 2.0, "flops_per_token": 100},
    {"k": 2, "decode_ms_per_token": 3.0, "flops_per_token": 150},
    {"k": 4, "decode_ms_per_token": 2.9, "flops_per_token": 250},  # faster than k=2: noise happens
    {"k": 8, "decode_ms_per_token": 6.0, "flops_per_token": 450},
]


def test_budget_picks_the_largest_k_that_fits():
    assert pick_k(ROWS, budget_ms_per_token=3.0) == 4
    assert pick_k(ROWS, budget_ms_per_token=2.95) == 4
    assert pick_k(ROWS, budget_ms_per_token=2.5) == 1
    assert pick_k(ROWS, budget_ms_per_token=100) == 8
    assert pick_k(ROWS, budget_flops=249) == 2 and pick_k(ROWS, budget_flops=250) == 4
    with pytest.raises(ValueError, match="no k fits a budget of 1 decode ms per token: the cheapest, k=1, needs 2"):
        pick_k(ROWS, budget_ms_per_token=1.0)
    with pytest.raises(ValueError, match="exactly one budget"):
        pick_k(ROWS, budget_ms_per_token=1.0, budget_flops=10)


def test_ks():
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    assert parse_ks("4, 1,2", 8) == [1, 2, 4]
    for bad in ("0,1", "9", "a", ""):
        with pytest.raises(ValueError, match="--k"):
            parse_ks(bad, 8)


@pytest.fixture
def exported(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"text number {i} " * 200)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(num_layers=2, num_heads=2, max_seq_len=32,
                                       moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)))
    data = {"path": str(corpus), "val_permille": 300, "cache_dir": str(tmp_path / "cache")}
    return moe.save_pretrained(model, tmp_path / "model", metadata={"data": data}), model


def test_slim_sweep_writes_table_and_plot(exported, capsys):
    path, model = exported
    args = ["slim", "--model", str(path), "--k", "1,2,4", "--tokens", "64", "--batch-size", "2", "--decode-tokens", "2"]
    assert main([*args, "--budget-flops", str(model.flops_per_token(active_k=2, context=16))]) == 0
    printed = capsys.readouterr().out
    out = path / "slim"
    rows = list(csv.DictReader((out / "slim.csv").open()))
    assert [int(r["k"]) for r in rows] == [1, 2, 4]
    assert [int(r["active_parameters"]) for r in rows] == [model.num_parameters(active_k=k) for k in (1, 2, 4)]
    assert all(float(r["val_loss"]) > 0 and float(r["decode_tokens_per_s"]) > 0 for r in rows)
    assert (out / "slim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "slim.md").read_text().count("\n| ") == 4  # header + 3 rows after the title
    assert json.loads((out / "slim.json").read_text())["rows"][2]["k"] == 4
    assert "budget: k=2 is the largest measured k within the budget" in printed
    # the same weights at k = E, evaluated directly, give the sweep's loss
    from launch.evaluate import evaluate_path

    direct = evaluate_path(str(path), k=4, tokens=64, batch_size=2)
    assert float(rows[2]["val_loss"]) == pytest.approx(direct["loss"], rel=1e-6)
    # generate --experts auto reads the saved sweep
    flops_k1 = model.flops_per_token(active_k=1, context=16)
    assert main(["generate", "--model", str(path), "--prompt", "te", "--max-new-tokens", "3",
                 "--experts", "auto", "--budget-flops", str(flops_k1)]) == 0
    assert "at k=1 of 4 experts" in capsys.readouterr().out


def test_slim_bad_input(exported, tmp_path, capsys):
    path, _ = exported
    assert main(["slim", "--model", str(path), "--k", "5"]) == 2
    assert "every k must be in 1..4" in capsys.readouterr().err
    assert main(["slim", "--model", str(path), "--out", str(path / ".." / path.name)]) == 2  # MODEL itself: refused
    assert "is --model" in capsys.readouterr().err and not (path / "slim.csv").exists()
    assert main(["slim", "--model", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--prompt", "x", "--experts", "auto", "--budget-flops", "1"]) == 2
    assert "run `moe slim --model" in capsys.readouterr().err


def test_experiment_command_trains_exports_and_tabulates(tmp_path, cache, capsys):
    """`moe experiment slimming`, shrunk to 3 steps on one rank: both runs trained and exported,
    the table holds each run's loss at k = 1, 2, 4, 8 and equals a direct evaluation."""
    from launch.evaluate import evaluate_path

    out = tmp_path / "exp"
    args = ["experiment", "slimming", "--out", str(out), "--nproc", "1", "--tokens", "256",
            "--set", "train.steps=3", "--set", "train.eval_every=0", "--set", "train.log_every=1",
            "--set", f"data.cache_dir={cache}"]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["k"] for r in rows] == [1, 2, 4, 8]
    direct = evaluate_path(str(out / "learned_k2" / "export"), k=4, tokens=256)["loss"]
    assert rows[2]["learned_k2_val_loss"] == pytest.approx(direct, rel=1e-6)
    assert (out / "results.md").read_text().count("\n| ") >= 5
    # run again: the exports are reused, nothing is retrained
    assert main(args) == 0
    assert capsys.readouterr().out.count("not training again") == 2


def test_slim_of_a_quantized_export_measures_the_fp_model_beside_it(exported, tmp_path, capsys):
    """`moe slim` on a quantized export: the FP model it was made from, found through the export's
    metadata, measured at every k on the same windows; its column equals a direct evaluation of the
    FP model, and the paired difference's mean is the difference of the two losses."""
    from launch.evaluate import evaluate_path
    from launch.quantize.job import QuantizeOptions, quantize_model

    path, _ = exported
    quantized = tmp_path / "w2"
    quantize_model(str(path), str(quantized), QuantizeOptions(method="rtn", bits=2), progress=False)
    out = tmp_path / "sweep"
    args = ["slim", "--model", str(quantized), "--out", str(out), "--k", "1,4", "--tokens", "96", "--batch-size", "2",
            "--decode-tokens", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| k | val loss | baseline val loss | Δ (paired) |" in printed
    report = json.loads((out / "slim.json").read_text())
    assert report["facts"]["baseline"] == str(path.resolve()) and report["facts"]["quantized"]
    for row in report["rows"]:
        fp = evaluate_path(str(path), k=row["k"], tokens=96, batch_size=4)
        assert row["baseline_val_loss"] == pytest.approx(fp["loss"], rel=1e-6)
        assert row["delta_vs_baseline"] == pytest.approx(row["val_loss"] - fp["loss"], abs=1e-9)
        assert row["val_loss"] != pytest.approx(fp["loss"], rel=1e-6)  # 2 bits: not the FP model
    assert main([*args, "--no-baseline", "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / "slim.json").read_text())["rows"][0]
    assert not any(key.startswith("baseline") for key in alone)
