"""``moe plan``: the cost model's memory and traffic against hand counts, the layout search's
rejections, the cluster file's errors and the command line. No ranks are started."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from launch.cli import main
from launch.config import RunConfig, load_run_config
from launch.plan.cluster import Cluster, cluster_from_dict, load_cluster
from launch.plan.model import (Layout, all_to_all_seconds, estimate, memory_per_device, model_facts,
                               rank, reduction_seconds, search)
from moe import ModelConfig, MoEConfig, MoETransformer, set_active_experts
from moe.errors import UserError

REPO = Path(__file__).resolve().parents[2]
CLUSTER = dict(name="test", gpus_per_node=4, nodes=2, peak_flops=1e14, memory_gib=40.0, memory_gbps=1000.0,
               intra_node_gbps=100.0, inter_node_gbps=10.0)


def small_run(num_experts=4, **model) -> RunConfig:
    """Two blocks (an MoE and a dense one), learned router: every weight is a parameter."""
    config = ModelConfig(vocab_size=32, num_layers=2, num_heads=2, max_seq_len=16, moe_every=2, tie_embeddings=False,
                         moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=num_experts, top_k=2), **model)
    from launch.config import TrainConfig

    return RunConfig(model=config, train=TrainConfig(seq_len=16))


def cluster(**changes) -> Cluster:
    return cluster_from_dict({**CLUSTER, **changes})


def test_facts_count_what_the_models_state_dict_holds():
    run = small_run()
    facts = model_facts(run, k=2)
    state = MoETransformer(run.model).state_dict()
    assert facts.params == sum(t.numel() for t in state.values())
    assert facts.expert_params == sum(t.numel() for name, t in state.items() if ".experts." in name)
    assert facts.layer_ks == (2,) and facts.layer_experts == (4,)
    assert facts.ops_per_micro_batch > 0 and facts.ops_per_step > 0
    model = MoETransformer(run.model)
    set_active_experts(model, 2)
    from launch.train import train_flops_per_token

    assert facts.train_flops_per_token == train_flops_per_token(model, 16)


@pytest.mark.parametrize("bf16", [True, False])
def test_model_state_memory_matches_a_hand_count_per_zero_stage(bf16):
    run = small_run()
    facts = model_facts(run, k=2, count=False)
    state = MoETransformer(run.model).state_dict()
    experts = sum(t.numel() for name, t in state.items() if ".experts." in name)
    dense = sum(t.numel() for t in state.values()) - experts
    world, ep = 8, 2
    local_experts, expert_group = experts / ep, world // ep
    c = cluster(device="cuda" if bf16 else "cpu")
    weight, grad = (2, 2) if bf16 else (4, 4)
    for zero in range(4):
        master = 4 if (bf16 or zero >= 1) else 0
        optimizer = master + 8
        expected = 0.0
        for params, group in ((dense, world), (local_experts, expert_group)):
            expected += params * (weight / (group if zero >= 3 else 1) + grad / (group if zero >= 2 else 1)
                                  + optimizer / (group if zero >= 1 else 1))
        parts = memory_per_device(facts, Layout(world, ep, zero, 1, 1), c)
        assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(expected)


def test_memory_does_not_grow_from_zero_0_to_3():
    """Model states shrink stage by stage wherever there is a group to shard over; in total too, with
    small buckets, except that ZeRO-3's gathered block weights can outweigh its savings with few blocks
    (tiny.yaml's 4) or few ranks to shard the experts over, so the total's last step is checked where
    the experts are sharded 16 or 64 ways: gpu_example.yaml on 64 ranks at EP 4 and 1."""
    c = cluster(gpus_per_node=8, nodes=8)
    small_buckets = {"reduce_bucket_size": 1000, "overlap_comm": True}
    for path, stages in (("tiny.yaml", 3), ("gpu_example.yaml", 4)):  # stages: how far the total is checked
        facts = model_facts(load_run_config(REPO / "configs" / path), count=False)
        for world, ep in ((8, 1), (8, 2), (8, 8), (64, 4), (64, 1)):
            states, totals = [], []
            for zero in range(4):
                parts = memory_per_device(facts, Layout(world, ep, zero, 1, 1), c, small_buckets)
                states.append(parts["weights"] + parts["gradients"] + parts["optimizer"])
                totals.append(sum(parts.values()))
            assert all(a > b for a, b in zip(states, states[1:])), (path, world, ep, states)
            last = 4 if stages == 4 and world // ep >= 16 else 3
            assert all(a >= b for a, b in zip(totals[:last], totals[1:last])), (path, world, ep, totals)


def test_activations_grow_with_the_micro_batch_and_a2a_buffers_exist_only_under_ep():
    facts = model_facts(small_run(), k=2, count=False)
    c = cluster()
    one, four = (memory_per_device(facts, Layout(8, 1, 1, mb, 1), c) for mb in (1, 4))
    assert four["activations"] == pytest.approx(4 * one["activations"]) and one["activations"] > 0
    assert "a2a_buffers" not in one
    assert memory_per_device(facts, Layout(8, 2, 1, 1, 1), c)["a2a_buffers"] > 0


@pytest.mark.parametrize("ep,accum", [(2, 1), (4, 3), (8, 2)])
def test_all_to_all_volume_is_the_bench_formula(ep, accum):
    from launch.bench.ep import all_to_all_bytes_per_step

    facts = model_facts(load_run_config(REPO / "configs" / "tiny.yaml", ["model.moe.k_schedule=constant"]), count=False)
    c = cluster(gpus_per_node=8, nodes=1, collective_latency_us=0.0, intra_node_gbps=7.0)  # time = bytes / bw
    layout = Layout(8, ep, 1, 2, accum)
    tokens = 2 * facts.seq_len
    expected = accum * all_to_all_bytes_per_step(facts.moe_layers, tokens, 2, facts.hidden, 2, ep)
    assert all_to_all_seconds(facts, layout, c) * 7e9 == pytest.approx(expected)
    assert all_to_all_seconds(facts, Layout(8, 1, 1, 2, accum), c) == 0.0
    if ep == 8:  # over two nodes of 4: 3 of 7 peers on the node, 4 across, both links busy at once
        two_nodes = cluster(gpus_per_node=4, nodes=2, collective_latency_us=0.0, intra_node_gbps=7.0, inter_node_gbps=7.0)
        assert all_to_all_seconds(facts, layout, two_nodes) * 7e9 == pytest.approx(expected * 4 / 7)


def test_reduction_is_free_alone_and_slower_across_nodes():
    facts = model_facts(small_run(), k=2, count=False)
    c = cluster()
    assert reduction_seconds(facts, Layout(1, 1, 1, 1, 1), c) == 0.0
    within = reduction_seconds(facts, Layout(4, 1, 1, 1, 1), c)  # one node of 4
    across = reduction_seconds(facts, Layout(8, 1, 1, 1, 1), c)  # two nodes
    assert 0 < within < across
    # ZeRO-2 reduce-scatters every micro-batch; ZeRO-1 once per step
    assert reduction_seconds(facts, Layout(8, 1, 2, 1, 4), c) > reduction_seconds(facts, Layout(8, 1, 1, 1, 4), c)


def test_search_rejects_each_layout_by_its_reason():
    facts = model_facts(small_run(num_experts=6), k=2, count=False)
    c = cluster(gpus_per_node=4, nodes=1)
    results = search(facts, c, global_batch_tokens=4 * 2 * 16, micro_batches=[1, 2, 4])
    reason = {(r.layout.ep, r.layout.zero, r.layout.micro_batch): r.reason for r in results}
    assert reason[(3, 1, 2)] == "EP does not divide the world size (4)"
    assert reason[(4, 1, 2)] == "EP does not divide num_experts (6)"
    assert reason[(2, 1, 4)].startswith("global batch (128 tokens) is not a multiple")
    assert reason[(2, 3, 2)].startswith("ZeRO-3")
    assert reason[(2, 1, 2)] is None and reason[(1, 0, 1)] is None
    assert next(r for r in results if r.layout.micro_batch == 1).layout.grad_accum == 2
    feasible = rank(results)
    assert [r.tokens_per_s for r in feasible] == sorted((r.tokens_per_s for r in feasible), reverse=True)
    tight = cluster(gpus_per_node=4, nodes=1, memory_gib=1.000001, memory_reserve_gib=1.0)  # 1 KiB left
    full = search(facts, tight, 4 * 32 * 16, micro_batches=[32])
    assert {r.reason for r in full if r.layout.ep in (1, 2)} == {"out of memory"}
    assert all("GiB of 1 (+" in r.detail for r in full if r.reason == "out of memory")


def test_per_block_expert_counts_must_all_be_divided():
    run = small_run()
    run.model = dataclasses.replace(run.model, moe_every=1, moe=dataclasses.replace(run.model.moe, num_experts=[4, 8]))
    facts = model_facts(run, k=2, count=False)
    results = search(facts, cluster(gpus_per_node=8, nodes=1), 8 * 16, micro_batches=[1], zero_stages=[1])
    reason = {r.layout.ep: r.reason for r in results}
    assert reason[8] == "EP does not divide num_experts ([4, 8])"
    assert reason[4] is None and reason[2] is None


def test_step_time_has_its_three_parts():
    facts = model_facts(small_run(), k=2)
    alone = estimate(facts, Layout(1, 1, 0, 2, 1), cluster())
    assert alone.a2a_s == 0 and alone.allreduce_s == 0 and alone.compute_s > 0
    spread = estimate(facts, Layout(8, 2, 1, 2, 1), cluster())
    assert spread.a2a_s > 0 and spread.allreduce_s > 0
    assert spread.step_s == pytest.approx(spread.compute_s + spread.a2a_s + spread.allreduce_s)
    assert spread.tokens_per_s == pytest.approx(8 * 2 * 16 / spread.step_s)


def _write_cluster(path: Path, **changes) -> Path:
    import yaml

    values = {**CLUSTER, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None}))
    return path


@pytest.mark.parametrize("change,field", [
    ({"peak_flops": -1.0}, "cluster.peak_flops=-1.0"),
    ({"matmul_efficiency": 1.5}, "cluster.matmul_efficiency=1.5"),
    ({"gpus_per_node": 0}, "cluster.gpus_per_node=0"),
    ({"memory_gib": None}, "missing field 'memory_gib'"),
    ({"inter_node_gbs": 3.0}, "inter_node_gbs"),
    ({"device": "tpu"}, "cluster.device='tpu'"),
])
def test_bad_cluster_file_is_one_user_error_naming_the_field(tmp_path, capsys, change, field):
    path = _write_cluster(tmp_path / "bad.yaml", **change)
    with pytest.raises(UserError, match=field.replace("(", r"\(").replace(".", r"\.")):
        load_cluster(path)
    assert main(["plan", "--config", "configs/tiny.yaml", "--cluster", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_shipped_cluster_files_load():
    for path in (REPO / "configs" / "clusters").glob("*.yaml"):
        if path.name != "measurements.yaml":
            assert load_cluster(path).world_size >= 1


def test_cli_prints_the_best_layouts_and_the_rejected_ones(tmp_path, capsys):
    cluster_path = _write_cluster(tmp_path / "c.yaml", memory_gib=1.2, memory_reserve_gib=1.0)
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--config", "configs/tiny.yaml", "--cluster", str(cluster_path), "--set",
                 "model.num_layers=2", "--top", "3", "--micro-batches", "1,64", "--zero", "0,1,2,3",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "best 3:" in out and "tokens/s" in out and "rejected:" in out
    assert "out of memory" in out and "ZeRO-3" in out
    report = json.loads(out_json.read_text())
    speeds = [r["tokens_per_s"] for r in report["feasible"]]
    assert speeds == sorted(speeds, reverse=True) and len(speeds) >= 3
    table = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit() and "%" in line]
    assert [float(row[-2].replace(",", "")) for row in table] == pytest.approx([round(s) for s in speeds[:3]], abs=1)
    assert report["rejected"] and all(r["reason"] for r in report["rejected"])


def test_cli_input_errors_are_one_line(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml"]) == 2
    assert "--cluster" in capsys.readouterr().err
    assert main(["plan", "--config", "configs/tiny.yaml", "--cluster", "configs/clusters/h100_8x16.yaml",
                 "--nodes", "0"]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err


def test_measurements_file_names_loadable_runs_and_its_cluster():
    from launch.plan.validate import load_measurements

    path = REPO / "configs" / "clusters" / "measurements.yaml"
    measurements = load_measurements(path)
    load_cluster(path.parent / measurements["cluster"])
    for check in measurements["checks"]:
        assert check.get("quote"), check["name"]  # each figure quotes its source
        if "config" in check:
            load_run_config(REPO / check["config"], check.get("set", []))


def test_bench_rows_compare_each_reported_case(tmp_path):
    from launch.plan.validate import bench_rows

    report = {"world_size": 2, "results": [
        {"config": "tiny", "ep": 1, "step_ms": 500.0, "a2a_ms": 0.0},
        {"config": "tiny", "ep": 2, "step_ms": 400.0, "a2a_ms": 100.0},
        {"config": "tiny", "ep": 2, "chunks": 2, "step_ms": 400.0, "a2a_ms": 100.0},  # overlapped: not modelled
    ]}
    rows = bench_rows(report, cluster(device="cpu"))
    assert [r.name for r in rows] == ["bench ep tiny EP=1: step", "bench ep tiny EP=2: step", "bench ep tiny EP=2: all-to-all"]
    assert "waiting for the other rank included" in rows[2].note
    report["results"][1].update(lined_up=True, wait_ms=12.5)  # moe bench ep --line-up
    lined_up = bench_rows(report, cluster(device="cpu"))[2]
    assert lined_up.measured == 100.0 and "lined up by a barrier" in lined_up.note and "12.5 ms" in lined_up.note
    assert all(r.predicted > 0 and r.ratio == pytest.approx(r.predicted / r.measured) for r in rows)
    assert {r.verdict for r in rows} <= {"PASS", "FAIL"}
