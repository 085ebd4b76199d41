"""A stopped job stops, nothing is lost or overwritten: signals to `moe train` reach its ranks, one
job per run folder, and checkpoints that are found, verified and never pruned across runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.cli import main as moe_main
from launch.joblock import JobLock
from parallel.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    _prune,
    find_checkpoint,
    latest_tag,
    resolve,
    trainer_state,
    verify,
    write_manifest,
)
from tests.runs import REPO, TINY, rank_env, records, set_args, train_under_launcher

SHORT = ["train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.keep_checkpoints=0",
         "model.moe.k_schedule_steps=40"]


def _sets(out_dir: Path, cache: Path, extra=()) -> list[str]:
    return set_args([*SHORT, f"out_dir={out_dir}", f"data.cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def run8(tmp_path_factory, cache) -> Path:
    """tiny.yaml on 2 ranks, 8 steps, checkpoints at 4 and 8 (with manifests)."""
    out_dir = tmp_path_factory.mktemp("run8")
    train_under_launcher(out_dir, cache, [*SHORT, "train.steps=8", "train.save_every=4"])
    return out_dir


def _moe(args: list[str]) -> subprocess.CompletedProcess:
    """``moe ARGS`` in a process of its own (DeepSpeed's logging outlives pytest's captured streams)."""
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=rank_env(), capture_output=True,
                          text=True, timeout=300)


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ----------------------------------------------------------------------------- checkpoints


def test_every_checkpoint_has_a_manifest_that_verifies(run8):
    root = run8 / "checkpoints"
    for tag in ("step00000004", "step00000008"):
        manifest = json.loads((root / tag / MANIFEST).read_text())
        assert manifest["step"] == int(tag[4:]) and manifest["run_id"] == trainer_state(root, tag)["run_id"]
        listed = set(manifest["files"])
        on_disk = {str(p.relative_to(root / tag)) for p in (root / tag).rglob("*") if p.is_file() and p.name != MANIFEST}
        assert listed == on_disk and "mp_rank_00_model_states.pt" in listed and "model.safetensors" in listed
        assert verify(root / tag) is None


@pytest.mark.parametrize("pointer", ["", "garbage\x00\xff", "step00000099", "../outside"])
def test_a_broken_latest_pointer_still_finds_the_newest_complete_checkpoint(run8, tmp_path, pointer):
    root = _copy(run8, tmp_path) / "checkpoints"
    (root / LATEST).write_bytes(pointer.encode("utf-8", "surrogateescape"))
    assert latest_tag(root) == "step00000008"
    assert find_checkpoint(root) == ("step00000008", [])
    assert resolve(root) == (root, "step00000008")
    (root / LATEST).unlink()
    assert latest_tag(root) == "step00000008"


def test_a_corrupted_checkpoint_is_reported_and_the_one_before_it_used(run8, tmp_path):
    root = _copy(run8, tmp_path) / "checkpoints"
    states = root / "step00000008" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-100])  # truncated
    assert "mp_rank_00_model_states.pt has" in verify(root / "step00000008", checksums=False)
    tag, skipped = find_checkpoint(root)
    assert tag == "step00000004" and len(skipped) == 1 and "step00000008 is corrupted" in skipped[0]
    assert resolve(root) == (root, "step00000004")
    with pytest.raises(CheckpointError, match="step00000008' is corrupted: mp_rank_00_model_states.pt has"):
        find_checkpoint(root, "step00000008")
    # the same size, other bytes: only the checksum sees it
    model = root / "step00000004" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    assert verify(root / "step00000004", checksums=False) is None
    assert "SHA-256 mismatch" in verify(root / "step00000004")
    assert find_checkpoint(root)[0] is None


def test_resume_skips_a_truncated_checkpoint_and_says_so(run8, tmp_path, cache):
    run = _copy(run8, tmp_path)
    states = run / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: len(states.read_bytes()) // 2])
    result = _moe(["train", "--config", str(TINY), "--nproc", "1", "--resume", "--until-step", "5",
                   *_sets(run, cache, ["train.steps=8", "train.save_every=4"])])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint step00000008 is corrupted" in result.stderr
    assert "resuming from checkpoint" in result.stderr and "step00000004 (step 4)" in result.stderr
    assert trainer_state(run / "checkpoints", latest_tag(run / "checkpoints"))["step"] == 5


def test_resume_from_a_chosen_tag(run8, tmp_path, cache, capsys):
    run = _copy(run8, tmp_path)
    result = _moe(["train", "--config", str(TINY), "--nproc", "1", "--resume-from", "step00000004",
                   "--until-step", "6", *_sets(run, cache, ["train.steps=8", "train.save_every=4"])])
    assert result.returncode == 0, result.stderr[-2000:]
    assert trainer_state(run / "checkpoints", "step00000006")["step"] == 6
    code = moe_main(["train", "--config", str(TINY), "--resume-from", "step00000077",
                     *_sets(run, cache, ["train.steps=8"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint 'step00000077' is not in" in err[0], err


def test_a_fresh_run_is_refused_whatever_latest_says(run8, tmp_path, cache, capsys):
    run = _copy(run8, tmp_path)
    (run / "checkpoints" / LATEST).unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    code = moe_main(["train", "--config", str(TINY), *_sets(run, cache, ["train.steps=8"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already holds checkpoint step00000008; pass --resume" in err[0], err
    shutil.rmtree(run / "checkpoints")  # no checkpoints, but another run's training logs
    code = moe_main(["train", "--config", str(TINY), *_sets(run, cache, ["train.steps=8"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already holds the logs of another run" in err[0], err
    assert (run / "metrics.jsonl").read_text() == metrics and before


def test_pruning_keeps_to_the_checkpoints_of_its_own_run(tmp_path):
    root = tmp_path / "checkpoints"
    for step, run_id in ((1, "other"), (2, "mine"), (3, "other"), (4, "mine"), (5, "mine"), (6, None)):
        folder = root / f"step{step:08d}"
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text("{}")
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if run_id is not None:
            write_manifest(folder, run_id, step)
    _prune(root, keep=1, protect="step00000005", run_id="mine")
    assert sorted(p.name for p in root.iterdir()) == ["step00000001", "step00000003", "step00000005", "step00000006"]


# ----------------------------------------------------------------------------- one job per run folder


LOCK_CHILD = """
import sys, time
from launch.joblock import JobLock
lock = JobLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_the_run_folder_lock_refuses_a_second_job_and_takes_over_a_stale_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(tmp_path)], cwd=REPO, env=rank_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"is in use by another training job \(pid {holder.pid} on "):
            JobLock(tmp_path).acquire()
    finally:
        holder.kill()  # dies holding it: the kernel drops the lock, the file still names the dead job
        holder.wait()
    lock = JobLock(tmp_path).acquire()
    assert lock.previous["pid"] == holder.pid  # recognised as stale and taken over
    with pytest.raises(ValueError, match=rf"in use by another training job \(pid {os.getpid()} "):
        JobLock(tmp_path).acquire()  # even within one process, a second holder is refused
    lock.release()
    JobLock(tmp_path).acquire().release()


# ----------------------------------------------------------------------------- signals


def _rank_pids(moe_pid: int) -> list[int]:
    try:
        children = psutil.Process(moe_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for proc in children:
        try:
            command = " ".join(proc.cmdline())
            if "launch.train" in command and "deepspeed.launcher" not in command:
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _start_moe_train(out_dir: Path, cache: Path, extra=()) -> subprocess.Popen:
    command = [sys.executable, "-m", "launch.cli", "train", "--config", str(TINY), "--nproc", "2",
               *_sets(out_dir, cache, ["train.steps=1000", "train.save_every=3", *extra])]
    return subprocess.Popen(command, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_checkpoint(process, out_dir: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while latest_tag(out_dir / "checkpoints") is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert latest_tag(out_dir / "checkpoints") is not None, process.communicate()[0][-3000:]


@pytest.mark.slow
def test_sigterm_to_moe_train_stops_every_rank_with_a_checkpoint_that_resumes_exactly(tmp_path, cache, capsys):
    out_dir = tmp_path / "stopped"
    process = _start_moe_train(out_dir, cache)
    _wait_for_checkpoint(process, out_dir)
    ranks = _rank_pids(process.pid)
    assert len(ranks) == 2, ranks
    # a second job into the same folder is refused while this one runs
    code = moe_main(["train", "--config", str(TINY), "--resume", *_sets(out_dir, cache, ["train.steps=1000"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is in use by another training job" in err[-1], err
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output
    assert _alive(ranks) == []  # no orphans
    stopped = trainer_state(out_dir / "checkpoints", latest_tag(out_dir / "checkpoints"))["step"]
    assert stopped >= 3

    # the checkpoint resumes exactly: two more steps equal a straight run's
    resumed = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--config", str(TINY), "--nproc", "2",
                              "--resume", "--until-step", str(stopped + 2),
                              *_sets(out_dir, cache, ["train.steps=1000", "train.save_every=3"])],
                             cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    train_under_launcher(straight, cache, [*SHORT, "train.steps=1000", "train.save_every=1000"],
                         "--until-step", str(stopped + 2))
    after = {r["step"]: r["train/loss"] for r in records(out_dir, "train") if r["step"] > stopped}
    reference = {r["step"]: r["train/loss"] for r in records(straight, "train") if r["step"] > stopped}
    assert list(after) == [stopped + 1, stopped + 2] and after == reference


@pytest.mark.slow
def test_sigint_to_moe_train_exits_130_and_leaves_no_rank_behind(tmp_path, cache):
    out_dir = tmp_path / "interrupted"
    process = _start_moe_train(out_dir, cache)
    _wait_for_checkpoint(process, out_dir)
    ranks = _rank_pids(process.pid)
    assert len(ranks) == 2, ranks
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground command
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output[-3000:]
    assert "stopped by SIGINT" in output and "Traceback" not in output
    assert _alive(ranks) == []


# ----------------------------------------------------------------------------- data


def test_a_single_file_trains_and_the_log_says_how_it_was_split(tmp_path, cache):
    corpus = tmp_path / "one.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000)))
    out_dir = tmp_path / "single"
    result = _moe(["train", "--config", str(TINY), "--nproc", "1", "--data", str(corpus),
                   *_sets(out_dir, cache, ["train.steps=2", "train.save_every=2"])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: one file: split by byte ranges" in result.stderr
    assert [r["step"] for r in records(out_dir, "train")] == [1, 2]


def test_too_little_data_is_one_line_before_any_rank_starts_or_anything_is_written(tmp_path, cache, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("far too short for one sequence of 128 bytes\n" * 2)
    out_dir = tmp_path / "run"
    code = moe_main(["train", "--config", str(TINY), "--nproc", "2", "--data", str(corpus),
                     *_sets(out_dir, cache, ["train.steps=2"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "small.txt" in err[0] and "tokens" in err[0], err
    assert not out_dir.exists()


def test_a_truncated_weights_file_in_a_checkpoint_without_manifest_is_one_line(run8, tmp_path, capsys):
    """Checkpoints from before manifests are still read; a damaged file in one is named in one line."""
    root = _copy(run8, tmp_path) / "checkpoints"
    for manifest in root.glob(f"*/{MANIFEST}"):
        manifest.unlink()
    weights = root / "step00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = moe_main(["export", str(root), str(tmp_path / "export")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "step00000008/model.safetensors" in err[0], err
    assert not (tmp_path / "export").exists()
