"""The training job end to end: real ranks under the deepspeed launcher on CPU (gloo), resume
equality, export/load round trip, interruption by signal, and one clear error per bad input.

The runs are subprocesses (each rank its own process, as in production); the 2-rank run is shared
by the tests that only read what it wrote.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.cli import main as moe_main
from launch.config import load_run_config
from launch.evaluate import evaluate_path
from launch.export import export_checkpoint
from moe import MoETransformer, load_pretrained
from parallel.checkpoint import LATEST, latest_tag, model_state_dict, resolve, trainer_state
from tests.runs import REPO, TINY, rank_env, records, set_args, train_under_launcher

STEPS = 8
SHORT = [  # tiny.yaml, shortened: 8 steps, schedules compressed to fit, output every few steps
    f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=4", "data.val_tokens=4096",
    "train.save_every=4", "train.keep_checkpoints=0", f"model.moe.k_schedule_steps={STEPS}",
]


def _sets(out_dir: Path, cache: Path, extra=()) -> list[str]:
    return set_args([*SHORT, f"out_dir={out_dir}", f"data.cache_dir={cache}", *extra])


def _deepspeed(out_dir: Path, cache: Path, *extra_args: str, extra_sets=()):
    """Two ranks, started by the `deepspeed` launcher script itself (not through `moe train`)."""
    return train_under_launcher(out_dir, cache, [*SHORT, *extra_sets], *extra_args)


_records = records


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache) -> Path:
    out_dir = tmp_path_factory.mktemp("straight")
    _deepspeed(out_dir, cache)
    return out_dir


def test_two_ranks_under_the_deepspeed_launcher_learn_and_checkpoint(straight_run):
    train = _records(straight_run, "train")
    evals = _records(straight_run, "eval")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.3, evals
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.3
    # the k schedule ran (linear 2 -> 8 over the 8 steps: the formula at each step's index)
    assert [r["train/k"] for r in train] == [min(8, max(2, round(6 * s / STEPS) + 2)) for s in range(STEPS)]
    assert all("max_vio/blocks.0.ffn" in r and "load/blocks.3.ffn/expert_007" in r and r["train/grad_norm"] > 0 for r in train)
    ckpts = straight_run / "checkpoints"
    assert latest_tag(ckpts) == "step00000008" and (ckpts / "step00000004").is_dir()
    # ZeRO-1 on two ranks: each rank wrote its optimizer shard
    assert len(list((ckpts / "step00000008").glob("*optim_states.pt"))) == 2
    state = trainer_state(ckpts, "step00000008")
    assert state["step"] == STEPS and state["sampler"]["step"] == STEPS and state["active_experts"] == [7] * 4
    assert list((straight_run / "tensorboard").glob("events.out.tfevents.*"))


def test_the_fixed_random_router_is_unchanged_while_experts_and_biases_moved(straight_run):
    cfg = load_run_config(TINY, SHORT)
    torch.manual_seed(cfg.train.seed)
    initial = MoETransformer(cfg.model).state_dict()
    trained = model_state_dict(*resolve(straight_run / "checkpoints"))
    for layer in range(cfg.model.num_layers):
        prefix = f"blocks.{layer}.ffn"
        assert torch.equal(trained[f"{prefix}.router.weight"], initial[f"{prefix}.router.weight"])
        assert not torch.allclose(trained[f"{prefix}.experts.w1"], initial[f"{prefix}.experts.w1"])
        assert not torch.allclose(trained[f"{prefix}.experts.w2"], initial[f"{prefix}.experts.w2"])
        assert trained[f"{prefix}.router.expert_bias"].abs().sum() > 0
        assert int(trained[f"{prefix}.router.bias_updates"]) == STEPS  # one bias update per optimizer step


def test_resume_continues_exactly(straight_run, tmp_path, cache):
    out_dir = tmp_path / "resumed"
    _deepspeed(out_dir, cache, "--until-step", "4")
    assert latest_tag(out_dir / "checkpoints") == "step00000004"
    _deepspeed(out_dir, cache, "--resume")
    ours, straight = _records(out_dir, "train"), _records(straight_run, "train")
    assert [r["step"] for r in ours] == [r["step"] for r in straight]
    for a, b in zip(ours, straight):
        assert (a["train/loss"], a["train/lr"], a["train/k"]) == (b["train/loss"], b["train/lr"], b["train/k"]), a["step"]
    assert [r["val/loss"] for r in _records(out_dir, "eval")] == [r["val/loss"] for r in _records(straight_run, "eval")]
    resumed = model_state_dict(*resolve(out_dir / "checkpoints"))
    reference = model_state_dict(*resolve(straight_run / "checkpoints"))
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_export_and_load_give_the_same_evaluation(straight_run, tmp_path, cache):
    export = export_checkpoint(str(straight_run / "checkpoints"), str(tmp_path / "export"))
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    model = load_pretrained(export)
    assert [layer.active_experts for layer in (b.ffn for b in model.blocks)] == [7] * 4  # as at its last step
    weights = load_file(str(export / "model.safetensors"))
    reference = model_state_dict(*resolve(straight_run / "checkpoints"))
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), name
    kwargs = dict(cache_dir=str(cache), batch_size=16)
    from_export = evaluate_path(str(export), **kwargs)
    from_checkpoint = evaluate_path(str(straight_run / "checkpoints"), **kwargs)
    assert from_export["loss"] == from_checkpoint["loss"]
    # k is a run-time choice: fewer experts, a different loss, same weights
    at_k1 = evaluate_path(str(export), k=1, **kwargs)
    assert at_k1["k"] == [1] * 4 and at_k1["loss"] != from_export["loss"]


def test_one_validation_everywhere(straight_run, tmp_path, cache):
    """The trainer's last validation (2 ranks, each its share of the windows), `moe eval` on the
    export and on the checkpoint, `moe slim` and the experiments (evaluate_path) all measure the
    same windows: the same loss, standard error and token count, whatever the batch size."""
    from launch.slim import sweep

    export = export_checkpoint(str(straight_run / "checkpoints"), str(tmp_path / "export"))
    final = _records(straight_run, "eval")[-1]
    assert final["val_tokens"] == 4096 and final["val_windows"] == 32  # data.val_tokens=4096 in windows of 128
    results = [evaluate_path(str(export), batch_size=5), evaluate_path(str(straight_run / "checkpoints"), batch_size=32)]
    rows, facts = sweep(str(export), ks=[7], batch_size=3, decode_tokens=1)
    for result in results:
        assert result["tokens"] == 4096 and result["windows"] == 32 and result["seq_len"] == 128
        assert result["loss"] == pytest.approx(final["val/loss"], rel=1e-6)
        assert result["loss_stderr"] == pytest.approx(final["val/loss_stderr"], rel=1e-4)
    assert rows[0]["val_loss"] == pytest.approx(final["val/loss"], rel=1e-6) and facts["val_tokens"] == 4096
    # the standard error is that of the per-window means (a naive computation from the windows)
    windows = torch.tensor(results[0]["window_losses"], dtype=torch.float64)
    mean = sum(windows.tolist()) / 32
    naive = (sum((w - mean) ** 2 for w in windows.tolist()) / 31 / 32) ** 0.5
    assert results[0]["loss"] == pytest.approx(mean, rel=1e-12) and results[0]["loss_stderr"] == pytest.approx(naive)


def test_moe_eval_and_export_commands(straight_run, tmp_path, cache, capsys):
    out = tmp_path / "exported"
    assert moe_main(["export", str(straight_run / "checkpoints" / "step00000004"), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 4
    assert moe_main(["export", str(straight_run / "checkpoints"), str(out)]) == 2  # nothing overwritten
    assert "already holds an exported model" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 4
    report = tmp_path / "eval.json"
    code = moe_main(["eval", "--model", str(out), "--k", "3", "--tokens", "2048", "--cache-dir", str(cache), "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["k"] == [3] * 4 and result["tokens"] == 16 * 128
    assert "2,048 tokens in 16 windows of 128, spread evenly over the whole validation split" in printed
    for label in ("val loss", "perplexity", "MaxVio", "tokens/s"):
        assert label in printed
    assert f"{result['loss']:.4f}" in printed


def test_sigterm_stops_at_a_step_boundary_with_a_complete_checkpoint(tmp_path, cache):
    """One process without a launcher, on the user's own .txt and .jsonl files (--data)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 80)
    (corpus / "more.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 40}) for i in range(20)))
    out_dir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "launch.train", "--config", str(TINY), "--data", str(corpus),
               *_sets(out_dir, cache, ["train.steps=1000", "train.save_every=3", "train.eval_every=0"])]
    process = subprocess.Popen(command, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while latest_tag(out_dir / "checkpoints") is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert latest_tag(out_dir / "checkpoints") is not None, process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output
    tag = latest_tag(out_dir / "checkpoints")
    state = trainer_state(out_dir / "checkpoints", tag)
    assert 3 <= state["step"] < 1000 and tag == f"step{state['step']:08d}"
    assert (out_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt").is_file()
    assert json.loads((out_dir / "checkpoints" / tag / "run_config.json").read_text())["data"]["path"] == str(corpus)


def test_a_half_written_checkpoint_never_becomes_latest(straight_run, tmp_path):
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(straight_run / "checkpoints", root)
    (root / "step00000012").mkdir()  # a save killed before its files were all written
    (root / "step00000012" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert latest_tag(root) == "step00000008" and resolve(root) == (root, "step00000008")
    (root / LATEST).write_text("step00000012")  # even a pointer to it is not trusted: it has no manifest
    assert latest_tag(root) == "step00000008" and resolve(root) == (root, "step00000008")


def _run_moe(args: list[str], capsys) -> tuple[int, str]:
    code = moe_main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "model.moe.k_max=16"], "MoEConfig.k_max=16 is invalid: expected at most num_experts (8)"),
        (["--set", "model.moe.hidden_dim=8"], "unknown key(s) hidden_dim"),
        (["--set", "model.moe="], "missing key 'model.moe'"),
        (["--data", "/nonexistent/corpus"], "data path '/nonexistent/corpus' does not exist"),
        (["--resume"], "--resume: no complete checkpoint in"),
        (["--until-step", "50"], "--until-step 50 is invalid: expected 1..8"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cache, capsys, extra, message):
    out_dir = tmp_path / "run"
    code, err = _run_moe(["train", "--config", str(TINY), *_sets(out_dir, cache), *extra], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out_dir.exists()


def test_empty_data_folder(tmp_path, cache, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not a .txt or .jsonl file")
    code, err = _run_moe(["train", "--config", str(TINY), *_sets(tmp_path / "run", cache, [f"data.path={empty}"])], capsys)
    assert code == 2 and "no .txt or .jsonl files under" in err and len(err.splitlines()) == 1


def test_checkpoints_are_never_overwritten_or_mixed_across_shapes(straight_run, tmp_path, cache, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run / "checkpoints", run / "checkpoints")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, err = _run_moe(["train", "--config", str(TINY), *_sets(run, cache)], capsys)
    assert code == 2 and "already holds checkpoint step00000008; pass --resume" in err
    code, err = _run_moe(["train", "--config", str(TINY), *_sets(run, cache, ["model.moe.num_experts=4",
                                                                                "model.moe.k_max=4"]), "--resume"], capsys)
    assert code == 2 and "from another model shape: model.moe.num_experts is 8 there and 4 in this config" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    for args, text in [(["export", str(tmp_path / "absent"), str(tmp_path / "out")], "does not exist"),
                       (["export", str(tmp_path), str(tmp_path / "out")], "holds no complete checkpoint"),
                       (["eval", "--model", str(tmp_path / "absent")], "does not exist")]:
        code, err = _run_moe(args, capsys)
        assert code == 2 and text in err and len(err.splitlines()) == 1, err


def test_zero_stages_0_and_2_with_gradient_accumulation_agree(tmp_path, cache):
    """Same data, same seed: plain data parallelism and ZeRO-2 (sharded optimizer state and
    gradients), each with 2 micro-batches per step, give the same losses and gradient norms."""
    runs = {}
    for stage in (0, 2):
        out_dir = tmp_path / f"zero{stage}"
        _deepspeed(out_dir, cache, extra_sets=["train.steps=4", "train.eval_every=0", "train.save_every=4",
                                               "train.grad_accum=2", f"deepspeed.zero_optimization.stage={stage}"])
        runs[stage] = _records(out_dir, "train")
    assert [r["step"] for r in runs[0]] == [1, 2, 3, 4]
    for plain, zero2 in zip(runs[0], runs[2]):
        assert plain["train/loss"] == pytest.approx(zero2["train/loss"], rel=1e-6)
        assert plain["train/grad_norm"] == pytest.approx(zero2["train/grad_norm"], rel=1e-4)
    assert runs[0][-1]["train/loss"] < runs[0][0]["train/loss"]
