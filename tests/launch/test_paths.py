"""Paths: an output never replaces or mixes with its input (`moe quantize`, `moe export`, `moe slim`),
and the data paths recorded with a model never resolve against the current directory (`moe eval`,
`moe slim`, `moe quantize`, `moe export`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe
from launch.cli import main
from launch.evaluate import recorded_base, resolve_recorded_paths
from launch.export import check_output_apart
from moe import ModelConfig, MoEConfig, MoETransformer
from parallel.checkpoint import LATEST, MODEL_STATES, RUN_CONFIG
from tests.runs import REPO, TINY, rank_env, set_args


def _small_model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(num_layers=2, num_heads=2, max_seq_len=32,
                                      moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)))


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"text number {i} " * 200)
    return folder


@pytest.fixture
def relative_export(tmp_path):
    """RUN/export of a small model whose metadata records its corpus and cache as relative paths
    (``corpus``, ``runs/cache``), as a run config with relative paths had them; RUN/corpus exists."""
    run = tmp_path / "run"
    _corpus(run / "corpus")
    data = {"path": "corpus", "val_permille": 300, "cache_dir": "runs/cache"}
    return moe.save_pretrained(_small_model(), run / "export", metadata={"data": data})


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------
# Outputs never replace inputs
# ------------------------------------------------------------------------------------------------


def test_check_output_apart(tmp_path, monkeypatch):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.setenv("HOME", str(tmp_path / "run"))
    for out, relation in [(model, "is"), (tmp_path / "link", "is"), (model / ".." / "model", "is"), ("~/model", "is"),
                          (model / "q4", "is inside"), (tmp_path / "link" / "q4", "is inside"),
                          (tmp_path / "run", "contains"), ("~", "contains"), (model / "a" / ".." / "..", "contains")]:
        with pytest.raises(ValueError, match=f"--out '.*' {relation} --model"):
            check_output_apart(out, model, "--out", "--model")
    for out in (tmp_path / "run" / "model-q4", tmp_path / "other", model / ".." / "q4"):
        check_output_apart(out, model, "--out", "--model")
    check_output_apart(model / "slim", model, "--out", "--model", nested=True)  # a folder of its own inside
    check_output_apart(tmp_path, model, "--out", "--model", nested=True)
    with pytest.raises(ValueError, match="is --model"):
        check_output_apart(tmp_path / "link", model, "--out", "--model", nested=True)


def test_quantize_refuses_an_out_that_is_inside_or_holds_the_model(relative_export, tmp_path, monkeypatch, capsys):
    model = relative_export
    before = _files(tmp_path)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.setenv("HOME", str(tmp_path))
    outs = [str(model), str(tmp_path / "link"), str(model / ".." / "export"), "~/run/export", str(model / "q4"),
            str(model.parent), str(tmp_path)]
    for out in outs:
        for extra in ([], ["--overwrite"], ["--compare"], ["--method", "rtn", "--overwrite"]):
            assert main(["quantize", "--model", str(model), "--out", out, *extra]) == 2, (out, extra)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "--out" in err and "--model" in err, err
    assert main(["quantize", "--model", str(tmp_path / "link"), "--out", str(model), "--method", "rtn"]) == 2
    assert "is --model" in capsys.readouterr().err
    after = _files(tmp_path)
    after.pop("link")
    assert after == before  # nothing written, the model untouched
    # a folder beside the model is fine
    assert main(["quantize", "--model", str(model), "--out", str(model.parent / "q8"), "--method", "rtn", "--bits", "8"]) == 0
    assert moe.load_pretrained(model.parent / "q8").quantization["method"] == "rtn"


def test_export_refuses_an_out_that_is_inside_or_holds_the_checkpoints(tmp_path, capsys):
    """Refused before the checkpoint is read: a stand-in with the files that make it complete will do."""
    checkpoints = tmp_path / "run" / "checkpoints"
    step = checkpoints / "step00000002"
    step.mkdir(parents=True)
    (step / RUN_CONFIG).write_text(json.dumps({"out_dir": str(tmp_path / "run")}))
    (step / MODEL_STATES).write_bytes(b"")
    (checkpoints / LATEST).write_text("step00000002")
    before = _files(tmp_path)
    for source in (checkpoints, step):
        for out, relation in [(checkpoints, "is"), (step, "is inside"), (step / "export", "is inside"),
                              (checkpoints / ".." / "checkpoints", "is"), (tmp_path / "run", "contains")]:
            assert main(["export", str(source), str(out), "--overwrite"]) == 2
            err = capsys.readouterr().err
            assert f"{relation} the checkpoints folder" in err and err.count("\n") == 1, err
    assert _files(tmp_path) == before


def test_slim_refuses_the_model_folder_as_out(relative_export, tmp_path, capsys):
    before = _files(relative_export)
    for out in (relative_export, relative_export / ".." / "export"):
        assert main(["slim", "--model", str(relative_export), "--out", str(out), "--k", "1", "--tokens", "64"]) == 2
        assert "is --model" in capsys.readouterr().err
    assert _files(relative_export) == before


# ------------------------------------------------------------------------------------------------
# Caches never land in the current directory
# ------------------------------------------------------------------------------------------------


def test_eval_slim_and_quantize_resolve_recorded_paths_against_the_run(relative_export, tmp_path, monkeypatch, capsys):
    run = relative_export.parent
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert resolve_recorded_paths(relative_export, {"path": "corpus", "cache_dir": "runs/cache"}) == (
        str(run / "corpus"), str(run / "runs" / "cache"), 50)
    assert main(["eval", "--model", str(relative_export), "--device", "cpu", "--tokens", "64", "--batch-size", "2"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    caches = list((run / "runs" / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "val.bin").is_file()
    assert main(["slim", "--model", str(relative_export), "--k", "1,2", "--tokens", "64", "--batch-size", "2",
                 "--decode-tokens", "2", "--device", "cpu"]) == 0
    # quantize: the quantized export records the paths absolute, so it evaluates on the same split
    from launch.quantize.job import _read_export_meta, training_tokens

    meta = _read_export_meta(str(relative_export))
    assert meta["data"] == {"path": str(run / "corpus"), "val_permille": 300, "cache_dir": str(run / "runs" / "cache")}
    assert len(training_tokens(meta, None)) > 0
    q8 = tmp_path / "q8"
    assert main(["quantize", "--model", str(relative_export), "--out", str(q8), "--method", "rtn", "--bits", "8"]) == 0
    assert json.loads((q8 / "config.json").read_text())["data"] == meta["data"]
    assert main(["eval", "--model", str(q8), "--device", "cpu", "--tokens", "64", "--batch-size", "2"]) == 0
    assert list(cwd.iterdir()) == [] and list((run / "runs" / "cache").iterdir()) == caches
    # --cache-dir typed on the command line is relative to the current directory
    assert main(["eval", "--model", str(relative_export), "--device", "cpu", "--tokens", "64", "--batch-size", "2",
                 "--cache-dir", "mycache"]) == 0
    assert [p.name for p in cwd.iterdir()] == ["mycache"]


def test_recorded_base_of_older_exports_and_checkpoints(tmp_path):
    """Relative paths recorded with a model (exports and checkpoints from before runs recorded
    absolute ones) resolve against the run's folder: RUN for RUN/export, out_dir for a checkpoint."""
    run = tmp_path / "runs" / "t"
    checkpoints = run / "checkpoints"
    step = checkpoints / "step00000002"
    step.mkdir(parents=True)
    (step / RUN_CONFIG).write_text(json.dumps({"out_dir": "runs/t", "data": {"cache_dir": "runs/cache"}}))
    (checkpoints / LATEST).write_text("step00000002")
    assert recorded_base(checkpoints) == run and recorded_base(step) == run
    data = {"path": None, "val_permille": 50, "cache_dir": "cache"}
    export = moe.save_pretrained(_small_model(), run / "export", metadata={"data": data})
    assert recorded_base(export) == run
    assert resolve_recorded_paths(export, data) == (None, str(run / "cache"), 50)
    assert resolve_recorded_paths(checkpoints, data)[1] == str(run / "cache")
    assert resolve_recorded_paths(export, {"cache_dir": "/abs/cache", "path": "~/c"}) == (
        str(Path("~/c").expanduser()), "/abs/cache", 50)


@pytest.mark.slow
def test_a_run_with_relative_paths_exports_absolute_ones_and_evaluates_from_anywhere(tmp_path, monkeypatch, capsys):
    """tiny.yaml trained 2 steps from WORK with out_dir, data.path and data.cache_dir relative (as
    configs/tiny.yaml has them): the run records them absolute, so export and eval from another
    directory use WORK's cache."""
    work = tmp_path / "work"
    _corpus(work / "corpus")
    sets = set_args(["out_dir=runs/t", "data.path=corpus", "data.cache_dir=runs/cache", "data.val_permille=300",
                     "train.steps=2", "train.warmup_steps=1", "train.eval_every=0", "train.save_every=2",
                     "train.log_every=1"])
    result = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(TINY), *sets], cwd=work,
                            env=dict(rank_env(), PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    caches = sorted(p.name for p in (work / "runs" / "cache").iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = work / "runs" / "t"
    assert main(["export", str(run / "checkpoints"), str(run / "export")]) == 0
    meta = json.loads((run / "export" / "config.json").read_text())
    assert meta["data"] == {"path": str(work / "corpus"), "val_permille": 300, "cache_dir": str(work / "runs" / "cache"),
                            "val_tokens": 65536, "val_seq_len": 128}  # the validation settings, resolved
    assert meta["source"]["checkpoint"] == str(run / "checkpoints" / "step00000002")
    for model in (run / "export", run / "checkpoints"):
        assert main(["eval", "--model", str(model), "--device", "cpu", "--tokens", "64", "--batch-size", "2"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in (work / "runs" / "cache").iterdir()) == caches  # the run's own cache, reused
    assert not (run / "runs").exists()


def test_a_damaged_resume_file_of_quantize_is_one_line(tmp_path):
    """The files an unfinished quantization resumes from are checked like every other file."""
    from launch.quantize.job import Progress
    from moe.errors import UserError

    progress = Progress(tmp_path, {"method": "gptq"}, overwrite=False)
    progress.save_calibration(torch.zeros(2, 3, dtype=torch.int64))
    calibration = progress.root / "calibration.safetensors"
    calibration.write_bytes(calibration.read_bytes()[:20])
    with pytest.raises(UserError, match="calibration.safetensors"):
        progress.load_calibration()
    (progress.root / "block_0000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="block_0000.safetensors"):
        progress.load_block(0)
    (progress.root / "job.json").write_text("{not json")
    with pytest.raises(UserError, match="job.json"):
        Progress(tmp_path, {"method": "gptq"}, overwrite=False)
