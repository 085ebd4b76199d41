"""Expert parallelism on 2 real CPU ranks under the deepspeed launcher (gloo).

- the layer: EP=2 outputs and every gradient equal the unsliced layer's (reference: the same
  layer run on each rank's tokens, expert gradients summed over ranks), for the learned and the
  fixed random router, with skewed routing that leaves one rank and half the experts empty, and
  with capacity drops;
- training: EP=2 and EP=1 from the same seed give the same loss curve (ZeRO-0, where the trainer
  clips by the exact global norm, and ZeRO-1/2 with DeepSpeed's MoE parameter groups); resume at
  EP=2; resume at EP=1 from an EP=2 checkpoint and the reverse; the export of an EP=2 run equals
  the export of the EP=1 run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.config import load_run_config
from launch.export import export_checkpoint
from tests.runs import TINY, deepspeed_launch, records, train_under_launcher

WORKER = Path(__file__).with_name("ep_worker.py")
CASES = ("learned_top2", "random_bias_top3", "skewed_to_rank0", "capacity_probs", "shared_top2")
RTOL = 1e-4  # DeepSpeed's own MoE tests hold expert gradients to rtol 1e-4


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep-layer")
    deepspeed_launch(str(WORKER), "--out", str(out))
    return {(case, rank): json.loads((out / f"{case}.rank{rank}.json").read_text())
            for case in (*CASES, "replicas") for rank in (0, 1)}


@pytest.mark.parametrize("case", CASES)
def test_ep2_layer_matches_the_unsliced_layer(layer_results, case):
    for rank in (0, 1):
        r = layer_results[case, rank]
        assert r["same_routing"]
        assert r["output"] <= RTOL * r["output_scale"], r
        assert r["input_grad"] <= RTOL * r["output_scale"] * 10, r
        if r["router_grad"] is not None:
            assert r["router_grad"] <= RTOL * r["expert_grad_scale"], r
        for name, diff in r["expert_grads"].items():
            assert diff <= RTOL * r["expert_grad_scale"], (name, r)
        assert r["experts"] == [4 * rank, 4 * rank + 4]


def test_skewed_routing_leaves_one_rank_without_tokens(layer_results):
    rank0, rank1 = layer_results["skewed_to_rank0", 0], layer_results["skewed_to_rank0", 1]
    assert rank1["rows_received"] == 0 and rank1["local_expert_rows"] == [False] * 4  # zero-token experts
    assert rank0["rows_received"] > 0 and all(rank0["local_expert_rows"])


def test_a_replica_that_drifted_is_caught(layer_results):
    for rank in (0, 1):
        error = layer_results["replicas", rank]["error"]
        assert error is not None and "router.expert_bias" in error


def test_shared_experts_stay_data_parallel_and_see_their_ranks_tokens(layer_results):
    for rank in (0, 1):
        r = layer_results["shared_top2", rank]
        assert r["shared_marked_expert"] is False  # all-reduced over every rank like any dense weight
        assert r["shared_grad"] <= RTOL * r["expert_grad_scale"], r  # from this rank's tokens alone


def test_capacity_mode_drops_per_rank(layer_results):
    assert all(layer_results["capacity_probs", rank]["dropped"] > 0 for rank in (0, 1))


# ----------------------------------------------------------------------------- training

STEPS, HALF = 12, 6
PYRAMID = "model.moe.num_experts=[4, 4, 8, 8]"
COMMON = [
    f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
    f"train.save_every={HALF}", "train.keep_checkpoints=0", f"model.moe.k_schedule_steps={STEPS}",
    "train.seq_len=64", "train.micro_batch_size=8",  # a quarter of tiny.yaml's tokens per step: enough to learn
]


def _run(out_dir: Path, cache: Path, ep: int, zero: int, *args: str) -> None:
    train_under_launcher(out_dir, cache, [*COMMON, f"parallel.expert_parallel_size={ep}",
                                          f"deepspeed.zero_optimization.stage={zero}"], *args)


def _losses(out_dir: Path) -> list[float]:
    return [r["train/loss"] for r in records(out_dir, "train")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ep-train")
    paths = {}
    paths["ep1"] = root / "ep1"
    _run(paths["ep1"], cache, ep=1, zero=1)
    paths["ep2_zero0"] = root / "ep2_zero0"
    _run(paths["ep2_zero0"], cache, ep=2, zero=0)
    # EP=1 (ZeRO-1) for half the steps, then resumed at EP=2 with ZeRO-0
    paths["ep1_then_ep2"] = root / "ep1_then_ep2"
    _run(paths["ep1_then_ep2"], cache, 1, 1, "--until-step", str(HALF))
    _run(paths["ep1_then_ep2"], cache, 2, 0, "--resume")
    # EP=2 (ZeRO-2) for half the steps, then resumed at EP=2 and, from a copy, at EP=1
    paths["ep2_then_ep2"] = root / "ep2_then_ep2"
    _run(paths["ep2_then_ep2"], cache, 2, 2, "--until-step", str(HALF))
    paths["ep2_then_ep1"] = root / "ep2_then_ep1"
    shutil.copytree(paths["ep2_then_ep2"], paths["ep2_then_ep1"])
    _run(paths["ep2_then_ep2"], cache, 2, 2, "--resume")
    _run(paths["ep2_then_ep1"], cache, 1, 2, "--resume")
    # a PR-MoE pyramid (4, 4, 8, 8 experts): EP=1 throughout, and EP=2 (ZeRO-2) resumed at EP=1
    paths["pyramid_ep1"] = root / "pyramid_ep1"
    _run(paths["pyramid_ep1"], cache, 1, 1, "--set", PYRAMID)
    paths["pyramid_ep2_then_ep1"] = root / "pyramid_ep2_then_ep1"
    _run(paths["pyramid_ep2_then_ep1"], cache, 2, 2, "--set", PYRAMID, "--until-step", str(HALF))
    _run(paths["pyramid_ep2_then_ep1"], cache, 1, 2, "--set", PYRAMID, "--resume")
    return paths


@pytest.mark.parametrize("name", ["ep2_zero0", "ep1_then_ep2", "ep2_then_ep2", "ep2_then_ep1"])
def test_loss_curve_matches_ep1(runs, name):
    reference, ours = _losses(runs["ep1"]), _losses(runs[name])
    assert len(reference) == len(ours) == STEPS
    assert reference[-1] < reference[0] - 0.5  # it trains
    assert ours == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_a_pyramid_trains_at_ep2_and_resumes_at_ep1_with_the_ep1_losses(runs):
    reference, ours = _losses(runs["pyramid_ep1"]), _losses(runs["pyramid_ep2_then_ep1"])
    assert len(reference) == len(ours) == STEPS
    assert ours == pytest.approx(reference, rel=1e-5, abs=1e-6)
    last = records(runs["pyramid_ep1"], "train")[-1]
    assert "load/blocks.0.ffn/expert_003" in last and "load/blocks.0.ffn/expert_004" not in last  # 4 experts
    assert "load/blocks.3.ffn/expert_007" in last
    # each rank's shard holds its slice of every layer: 2 of the 4-expert layers, 4 of the 8-expert ones
    shard = runs["pyramid_ep2_then_ep1"] / "checkpoints" / f"step{HALF:08d}" / "model.experts-00002-00004.safetensors"
    tensors = load_file(str(shard))
    assert tensors["blocks.0.ffn.experts.w1"].shape[0] == 2 and tensors["blocks.3.ffn.experts.w1"].shape[0] == 4


def test_ep2_logs_exchange_volume_and_per_rank_load(runs):
    last = records(runs["ep2_zero0"], "train")[-1]
    for rank in (0, 1):
        assert last[f"ep/rank{rank}/rows_sent_per_step"] > 0 and last[f"ep/rank{rank}/rows_received_per_step"] > 0
        assert 0 < last[f"ep/rank{rank}/all_to_all_share"] < 1
    assert last["ep/expert_rank0/load_share"] + last["ep/expert_rank1/load_share"] == pytest.approx(1.0)
    # rows rank 0 sends are the rows rank 1 receives
    assert last["ep/rank0/rows_sent_per_step"] == last["ep/rank1/rows_received_per_step"]


def test_export_of_an_ep2_run_equals_the_ep1_export(runs, tmp_path):
    ep1 = load_file(str(export_checkpoint(str(runs["ep1"] / "checkpoints"), str(tmp_path / "a")) / "model.safetensors"))
    ep2 = load_file(str(export_checkpoint(str(runs["ep2_zero0"] / "checkpoints"), str(tmp_path / "b")) / "model.safetensors"))
    assert ep1.keys() == ep2.keys()
    cfg = load_run_config(TINY)
    assert ep2["blocks.0.ffn.experts.w1"].shape[0] == cfg.model.moe.num_experts  # consolidated, not a slice
    for name in ep1:
        torch.testing.assert_close(ep2[name], ep1[name], rtol=1e-5, atol=1e-6, msg=name)
    # the shards on disk: each rank wrote its own experts
    shards = sorted(p.name for p in (runs["ep2_zero0"] / "checkpoints" / f"step{STEPS:08d}").glob("model.experts-*"))
    assert shards == ["model.experts-00000-00004.safetensors", "model.experts-00004-00008.safetensors"]


def test_ep_size_that_does_not_fit_is_one_clear_error(tmp_path, cache, capsys):
    from launch.cli import main

    base = ["train", "--config", str(TINY), "--set", f"out_dir={tmp_path / 'run'}", "--set", f"data.cache_dir={cache}"]
    assert main([*base, "--set", "parallel.expert_parallel_size=3"]) == 2
    assert "parallel.expert_parallel_size=3 is invalid: it must divide model.moe.num_experts (8)" in capsys.readouterr().err
    assert main([*base, "--set", "parallel.expert_parallel_size=4", "--nproc", "2"]) == 2
    assert "it must divide the number of ranks (--nproc 2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
