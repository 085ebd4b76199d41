"""``moe bench step``: its arithmetic and model construction as pure functions, and the command end to
end on CPU on a tiny config (speed is printed there, never asserted here)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from launch.bench import profiling
from launch.bench import step as bench
from launch.config import load_run_config
from moe import MoEConfig, MoETransformer, ModelConfig, set_active_experts
from moe.errors import UserError
from moe.layer import MoELayer
from moe.model import DenseFFN
from moe.schedules import k_at_step
from tests.runs import TINY


def _model_config(moe_every: int = 1, dense_ffn_hidden_size=None, num_layers: int = 4) -> ModelConfig:
    return ModelConfig(vocab_size=64, num_layers=num_layers, num_heads=2, max_seq_len=32, moe_every=moe_every,
                       dense_ffn_hidden_size=dense_ffn_hidden_size,
                       moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=6, top_k=3))


def test_shape_flags_default_to_issue_17_with_the_default_config_only():
    assert bench.config_overrides(None, None, None, default_config=True) == [
        "data.path=null", "model.num_layers=8", "train.seq_len=1024", "train.micro_batch_size=8"]
    assert bench.config_overrides(2, None, 4, default_config=True) == [
        "data.path=null", "model.num_layers=2", "train.seq_len=1024", "train.micro_batch_size=4"]
    assert bench.config_overrides(None, None, None, default_config=False) == []
    assert bench.config_overrides(None, 64, None, default_config=False) == ["train.seq_len=64"]
    with pytest.raises(UserError, match="--micro-batch"):
        bench.config_overrides(None, None, 0, default_config=False)
    cfg = load_run_config(bench.DEFAULT_CONFIG, bench.config_overrides(None, None, None, True))
    assert (cfg.model.num_layers, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.data.path) == (8, 1024, 8, None)


def test_cuda_graph_cases_run_on_cuda_only():
    everything = bench.cases_to_run("cuda", skip_compile=False, skip_graphs=False)
    assert everything == list(bench.CASES) and ("MoE", "graphs") in everything
    assert bench.cases_to_run("cpu", False, False) == [c for c in bench.CASES if c[1] != "graphs"]
    assert bench.cases_to_run("cuda", False, True) == [c for c in bench.CASES if c[1] != "graphs"]
    assert bench.cases_to_run("cuda", True, False) == [("MoE", "eager"), ("dense", "eager")]
    assert bench.COMPILE_MODES["graphs"] == "reduce-overhead"


def test_tokens_per_s_and_ratios():
    assert bench.tokens_per_s(8192, 25.0) == pytest.approx(327_680.0)
    assert bench.tokens_per_s(8192, None) is None and bench.tokens_per_s(8192, 0.0) is None
    assert bench.ratio(37.2, 26.3) == pytest.approx(37.2 / 26.3)
    assert bench.ratio(1.0, None) is None and bench.ratio(1.0, 0.0) is None and bench.ratio(None, 2.0) is None


def test_step_rows_give_tokens_per_s_tflops_and_moe_over_dense_per_mode():
    ms = {("MoE", "eager"): 40.0, ("dense", "eager"): 25.0, ("MoE", "compiled"): 30.0, ("dense", "compiled"): None}
    rows = bench.step_rows(ms, tokens_per_step=1000, flops_per_token={"MoE": 2e9, "dense": 1e9})
    assert [(r["model"], r["mode"]) for r in rows] == list(bench.CASES[:4])  # the measured ones, in order
    moe_eager, dense_eager, moe_compiled, dense_compiled = rows
    assert moe_eager["tokens_per_s"] == pytest.approx(25_000.0) and dense_eager["tokens_per_s"] == pytest.approx(40_000.0)
    assert moe_eager["tflops"] == pytest.approx(25_000.0 * 2e9 / 1e12)
    assert moe_eager["moe_over_dense"] == pytest.approx(1.6) and dense_eager["moe_over_dense"] is None
    assert moe_compiled["moe_over_dense"] is None  # its dense case failed: no ratio
    assert dense_compiled["tokens_per_s"] is None and dense_compiled["tflops"] is None
    skipped = bench.step_rows({("MoE", "eager"): 2.0, ("dense", "eager"): 1.0}, 10, {"MoE": 1.0, "dense": 1.0})
    assert len(skipped) == 2 and skipped[0]["moe_over_dense"] == pytest.approx(2.0)


def test_dense_equivalent_widths_replace_moe_ffns_only():
    assert bench.dense_equivalent_widths(_model_config(), k=4) == [32, 32, 32, 32]
    # moe_every=2: blocks 1 and 3 are dense already and keep their width (default f * top_k = 24)
    assert bench.dense_equivalent_widths(_model_config(moe_every=2), k=4) == [32, 24, 32, 24]
    assert bench.dense_equivalent_widths(_model_config(moe_every=2, dense_ffn_hidden_size=40), k=2) == [16, 40, 16, 40]


@pytest.mark.parametrize("moe_every", [1, 2])
def test_the_dense_equivalent_has_the_moe_models_flops_without_the_router(moe_every):
    """Same embedding, attention and norms; every MoE FFN a SwiGLU of width k*f: the forward FLOPs
    per token are the MoE model's at k less the routers' 2*d*E per MoE layer."""
    cfg = _model_config(moe_every=moe_every)
    k = 4
    torch.manual_seed(0)
    moe_model = MoETransformer(cfg)
    set_active_experts(moe_model, k)
    dense = bench.build_dense_equivalent(cfg, k)
    assert not any(isinstance(m, MoELayer) for m in dense.modules())
    widths = [block.ffn.w1.out_features for block in dense.blocks]
    assert widths == bench.dense_equivalent_widths(cfg, k)
    assert all(isinstance(block.ffn, DenseFFN) for block in dense.blocks)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    d, experts = cfg.hidden_size, cfg.moe.num_experts
    for context in (0, 16):
        assert dense.flops_per_token(context=context) == moe_model.flops_per_token(context=context) - moe_layers * 2 * d * experts
    shared = {name: p.shape for name, p in moe_model.named_parameters() if ".ffn." not in name}
    assert {name: p.shape for name, p in dense.named_parameters() if ".ffn." not in name} == shared
    ids = torch.randint(0, 64, (2, 9))
    _, loss = dense(ids[:, :-1], labels=ids[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # initialised like the model: near uniform


def test_train_overrides_hold_k_only_when_the_schedule_would_move_it():
    cfg = load_run_config(TINY)  # linear 2 -> 8 over 300 steps
    moe_cfg = cfg.model.moe
    assert bench.train_k_overrides(cfg.model, k_at_step(moe_cfg, 0), steps=10) == []
    k = k_at_step(moe_cfg, 200)
    assert k != k_at_step(moe_cfg, 0)
    overrides = bench.train_k_overrides(cfg.model, k, steps=10)
    held = load_run_config(TINY, overrides)
    assert [k_at_step(held.model.moe, step) for step in range(10)] == [k] * 10
    before = MoETransformer(cfg.model).num_parameters()
    assert MoETransformer(held.model).num_parameters() == before  # the same model, only k held
    assert bench.schedule_note(moe_cfg, 200, k).startswith(f"k = {k}: the k schedule's value at step 200 (linear, 2 -> 8")


def test_top_kernels_rank_by_time_with_shares_of_the_total():
    events = [("b", 300.0, 6), ("a", 600.0, 3), ("c", 100.0, 3), ("idle", 0.0, 5)]
    result = profiling.top_kernels(events, steps=3, top=2)
    assert result["total_ms_per_step"] == pytest.approx(1000.0 / 1e3 / 3)
    assert [k["name"] for k in result["kernels"]] == ["a", "b"]
    assert [k["share"] for k in result["kernels"]] == pytest.approx([0.6, 0.3])
    assert result["kernels"][0]["ms_per_step"] == pytest.approx(0.2) and result["kernels"][1]["calls_per_step"] == 2
    everything = profiling.top_kernels(events, steps=1, top=10)
    assert len(everything["kernels"]) == 3 and sum(k["share"] for k in everything["kernels"]) == pytest.approx(1.0)
    assert result["calls_per_step"] == pytest.approx(17 / 3)  # launches, idle ones included


def test_profiled_kernels_leave_out_the_gpu_side_of_user_annotations():
    from types import SimpleNamespace as Event

    cpu, cuda = "CPU", "CUDA"
    averages = [
        Event(key="Optimizer.step#AdamW.step", device_type=cuda, is_user_annotation=True,
              self_device_time_total=5500.0, self_cpu_time_total=0.0, count=1),  # spans the kernel below
        Event(key="multi_tensor_apply_kernel", device_type=cuda, is_user_annotation=False,
              self_device_time_total=5400.0, self_cpu_time_total=0.0, count=42),
        Event(key="aten::mm", device_type=cpu, is_user_annotation=False,
              self_device_time_total=0.0, self_cpu_time_total=80.0, count=3),
    ]
    on_gpu = profiling.profiled_events(averages, cuda=True, cuda_type=cuda)
    assert on_gpu == [("multi_tensor_apply_kernel", 5400.0, 42)]
    assert profiling.top_kernels(on_gpu, steps=1)["total_ms_per_step"] == pytest.approx(5.4)
    on_cpu = profiling.profiled_events(averages, cuda=False, cuda_type=cuda)
    assert ("aten::mm", 80.0, 3) in on_cpu and len(on_cpu) == 3


def test_trainer_tokens_per_s_is_total_tokens_over_total_step_time_after_the_warmup():
    records = [{"event": "eval", "step": 0, "val/loss": 5.0}]
    records += [{"event": "train", "step": s, bench.TOKENS_PER_S: rate} for s, rate in
                ((1, 10.0), (2, 1000.0), (3, 100.0), (4, 300.0))]
    got = bench.trainer_tokens_per_s(records, after_step=2)
    assert got["steps"] == 2 and got["windows"] == 2
    assert got["tokens_per_s"] == pytest.approx(2 / (1 / 100.0 + 1 / 300.0))  # 150: the harmonic mean
    # windows of 2 steps (log_every=2): a window counts with its steps
    wide = [{"event": "train", "step": s, bench.TOKENS_PER_S: r} for s, r in ((2, 50.0), (4, 100.0), (6, 200.0))]
    got = bench.trainer_tokens_per_s(wide, after_step=1)  # the window of steps 1-2 began in the warm-up
    assert got["steps"] == 4 and got["tokens_per_s"] == pytest.approx(4 / (2 / 100.0 + 2 / 200.0))
    assert bench.trainer_tokens_per_s(records[:2], after_step=1)["tokens_per_s"] is None


def test_records_of_a_metrics_file_being_written_leave_out_its_incomplete_last_line():
    text = '{"event": "train", "step": 1}\n{"event": "train", "step": 2}\n{"event": "tr'
    assert bench.read_records(text) == [{"event": "train", "step": 1}, {"event": "train", "step": 2}]
    assert bench.read_records("") == []


def test_the_master_weight_step_is_the_plain_step_in_fp32():
    """In fp32 the fp32 master copies change nothing: the same weights after two steps, bit for bit."""
    cfg = load_run_config(TINY, ["model.num_layers=1", "train.seq_len=16", "train.micro_batch_size=2"])
    torch.manual_seed(0)
    plain = MoETransformer(cfg.model)
    mastered = MoETransformer(cfg.model)
    mastered.load_state_dict(plain.state_dict())
    steps = [bench.make_step(m, cfg.train, torch.device("cpu"), master_weights=w) for m, w in ((plain, False), (mastered, True))]
    ids = torch.randint(0, 256, (2, 17))
    for _ in range(2):
        for step in steps:
            step(ids[:, :-1], ids[:, 1:])
    for (name, a), b in zip(plain.state_dict().items(), mastered.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    fresh = MoETransformer(cfg.model)  # the weights both started from
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()))
    assert all(p.grad is None for p in plain.parameters())  # zero_grad(set_to_none=True)


def test_bf16_as_deepspeed_casts_it_and_the_master_weights_round_to_the_model():
    """Parameters in bf16, buffers (rotary table, expert biases) in fp32; after a step with fp32
    master weights each parameter is its master rounded to bf16."""
    cfg = load_run_config(TINY, ["model.num_layers=1", "train.seq_len=16", "train.micro_batch_size=2",
                                 "model.moe.router=learned"])
    torch.manual_seed(0)
    model = bench.to_training_precision(MoETransformer(cfg.model), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.dtype == torch.float32 and model.blocks[0].ffn.router.expert_bias.dtype == torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    step = bench.make_step(model, cfg.train, torch.device("cpu"), master_weights=True)
    ids = torch.randint(0, 256, (2, 17))
    loss = step(ids[:, :-1], ids[:, 1:])
    assert torch.isfinite(loss)
    masters = [p for group in step.optimizer.param_groups for p in group["params"]]
    assert len(masters) == len(step.params) and all(m.dtype == torch.float32 for m in masters)
    for param, master in zip(step.params, masters):
        assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _table_rows(text: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first}")]


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def _run(capsys, tmp_path, cache, *extra) -> tuple[str, dict]:
    from launch.cli import main

    path = tmp_path / "step.json"
    argv = ["bench", "step", "--config", str(TINY), "--layers", "1", "--seq-len", "32", "--micro-batch", "2",
            "--steps", "2", "--warmup", "2", "--profile-steps", "1", "--device", "cpu",
            "--set", f"data.cache_dir={cache}", "--json", str(path), *extra]
    assert main(argv) == 0
    return capsys.readouterr().out, json.loads(path.read_text())


def test_bench_step_end_to_end_with_compiled_blocks(tmp_path, capsys, cache):
    """Every case measured; each printed ratio is the quotient of the printed times, each tokens/s
    the tokens per step over the printed time; the top-kernel tables have shares that add up."""
    printed, report = _run(capsys, tmp_path, cache, "--skip-train")
    assert "k = 2: the k schedule's value at step 0" in printed and "64 tokens per step (2 x 32)" in printed
    rows = {(r[0], r[1]): r for r in _table_rows(printed, "MoE") + _table_rows(printed, "dense")}
    assert set(rows) == set(bench.cases_to_run("cpu", skip_compile=False, skip_graphs=False)) == set(bench.CASES[:4])
    for (model, mode), row in rows.items():
        assert row[3] == "-"  # host ms/step: CUDA only (on the CPU the host does the work itself)
        ms, rate = _number(row[2]), _number(row[4])  # printed to 0.001 ms and to 1 token/s
        assert ms > 0 and abs(rate - 64 / (ms / 1e3)) <= 0.5 + rate * 5e-4 / ms, row
        if model == "MoE":
            dense_ms = _number(rows[("dense", mode)][2])
            quotient = ms / dense_ms  # the ratio is printed to 0.001
            assert abs(_number(row[6]) - quotient) <= 5e-4 + quotient * (5e-4 / ms + 5e-4 / dense_ms), row
    for name, case in report["cases"].items():
        assert case["ms_per_step"] > 0 and case["first_step_s"] > 0, name
    for row in report["rows"]:
        assert row["tokens_per_s"] == pytest.approx(64 / (row["ms_per_step"] / 1e3))
    assert "graph(s) compiled" in report["cases"]["MoE compiled"]["note"]
    assert set(report["profiles"]) == {"MoE eager", "MoE compiled"}
    for profile in report["profiles"].values():
        shares = [k["share"] for k in profile["kernels"]]
        assert 1 <= len(shares) <= profiling.TOP_KERNELS and shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    assert printed.count("Top kernels of the MoE") == 2 and "trainer" not in report


def test_bench_step_compares_moe_train_with_a_plain_loop(tmp_path, capsys, cache, monkeypatch):
    """The trainer part: `moe train` in a subprocess on the same model, batch and precision; the
    printed ratio is its tokens/s over the plain loop's."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the trainer runs no Triton kernel on CPU
    out_dir = tmp_path / "out"
    printed, report = _run(capsys, tmp_path, cache, "--skip-compile", "--set", f"out_dir={out_dir}")
    assert [(r["model"], r["mode"]) for r in report["rows"]] == [("MoE", "eager"), ("dense", "eager")]
    plain, train = report["trainer"]["loops"]
    assert plain["name"] == "plain loop (float32)" and train["name"].startswith("moe train")
    assert plain["tokens_per_s"] > 0 and train["tokens_per_s"] > 0
    assert plain["train_over_this"] == pytest.approx(train["tokens_per_s"] / plain["tokens_per_s"])
    (plain_row,) = _table_rows(printed, "plain loop")
    (train_row,) = _table_rows(printed, "moe train")
    train_rate, plain_rate = _number(train_row[1]), _number(plain_row[1])  # printed to 1 token/s
    quotient = train_rate / plain_rate
    assert abs(_number(plain_row[2]) - quotient) <= 5e-4 + quotient * (0.5 / train_rate + 0.5 / plain_rate)
    assert re.search(r"moe train \(DeepSpeed, ZeRO stage \d\): 2 steps after 2 warm-up steps", printed), printed[-1500:]
    kept = out_dir / "moe-train"  # --set out_dir keeps moe train's logs there, not its checkpoint
    steps = [r["step"] for r in map(json.loads, (kept / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "train"]
    assert steps[:4] == [1, 2, 3, 4] and (kept / "train.log").exists() and not (kept / "checkpoints").exists()


def test_train_stages_parse_and_each_gets_a_row(monkeypatch, cache):
    import argparse

    assert bench._stages("2,1,0") == [2, 1, 0] and bench._stages("3") == [3]
    for bad in ("", "4", "1,1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._stages(bad)

    cfg = load_run_config(TINY, [f"data.cache_dir={cache}"])
    asked = []

    def fake_train(cfg, k, precision, device, warmup, steps, timeout, keep_in=None, zero_stage=None):
        asked.append(zero_stage)
        return {"tokens_per_s": 1000.0 * (len(asked)), "steps": steps, "wall_s": 1.0, "kept": None}

    monkeypatch.setattr(bench, "run_moe_train", fake_train)
    monkeypatch.setattr(bench, "make_step", lambda *a, **kw: None)
    monkeypatch.setattr(bench, "time_plain_loop", lambda *a, **kw: 8.0)
    args = argparse.Namespace(warmup=1, steps=2, train_timeout=60.0, train_stages=[0, 2])
    model = MoETransformer(cfg.model)
    result = bench.run_trainer_overhead(model, cfg, 2, torch.float32, torch.device("cpu"), args)
    config_stage = cfg.deepspeed["zero_optimization"]["stage"]
    assert asked == [None if s == config_stage else s for s in (0, 2)]  # the config's own stage is not rewritten
    plain, first, second = result["loops"]
    assert [first["zero_stage"], second["zero_stage"]] == [0, 2]
    assert first["name"] == "moe train (DeepSpeed, ZeRO stage 0)" and second["tokens_per_s"] == 2000.0
    assert plain["train_over_this"] == pytest.approx(first["tokens_per_s"] / plain["tokens_per_s"])
    assert not result["failed"]
