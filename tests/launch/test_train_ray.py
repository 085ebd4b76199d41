"""`moe train --ray`: the training job as a Ray Train run (TorchTrainer, 2 CPU workers, gloo).

Against `moe train --nproc 2` (the deepspeed launcher) on the same config, seed and batches: the
same 20 training losses, bit for bit, at expert-parallel sizes 1 and 2 (the same per-rank job, the
same collectives in the same order on the same CPU kernels, one thread per rank on both sides: no
tolerance is needed, and any would hide a difference in what the ranks compute); the same run
folder and progress lines. A worker killed (SIGKILL) after a checkpoint was published: Ray Train
restarts the workers from that checkpoint and the run ends with the losses of an undisturbed one.
`ray job submit` to a real head with token authentication runs it, and a client without the token is
refused. Bad flags are one clear error.

Run with ``-s`` to see the losses side by side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.cli import main as moe_main
from parallel.engine import free_port
from tests.launch.ray_cluster import ray_head
from tests.runs import REPO, TINY, rank_env, records, set_args

STEPS = 20
SHORT = [f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
         "train.save_every=5", f"model.moe.k_schedule_steps={STEPS}",
         "train.seq_len=64", "train.micro_batch_size=8"]  # tiny.yaml's model; a quarter of its tokens per step
EP2 = ["parallel.expert_parallel_size=2"]
PROGRESS = re.compile(r"(training [\d,]+ parameters on .*|data: .*|step \d+: checkpoint .*|done: .*|"
                      r"(checkpoint|metrics|tensorboard): .*)$")
"""The lines rank 0 writes (besides the progress bar) in a run without validation."""


def _sets(out_dir: Path, cache: Path, extra=()) -> list[str]:
    return set_args([*SHORT, f"out_dir={out_dir}", f"data.cache_dir={cache}", *extra])


def _env() -> dict:
    env = rank_env()
    env.pop("RAY_ADDRESS", None)  # the command starts a local Ray of its own
    return env


def _moe_train(out_dir: Path, cache: Path, *flags: str, extra=()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launch.cli", "train", "--config", str(TINY), *flags,
               *_sets(out_dir, cache, extra)]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(out_dir: Path) -> list[float]:
    return [r["train/loss"] for r in records(out_dir, "train")]


def _progress(output: str) -> list[str]:
    """Rank 0's progress lines, without Ray's "(RayTrainWorker pid=...)" prefix, colours or the bar."""
    lines = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", output).replace("\r", "\n").splitlines():
        line = re.sub(r"^\(\w+ pid=\d+(, ip=[^)]*)?\)\s*", "", line.strip()).strip()
        if PROGRESS.match(line):
            lines.append(line)
    return lines


def _files(out_dir: Path) -> list[str]:
    """The run folder's files (the TensorBoard event file by its kind: its name holds host, pid and time)."""
    names = []
    for path in out_dir.rglob("*"):
        if path.is_file() and path.relative_to(out_dir).parts[0] != "ray":
            relative = str(path.relative_to(out_dir))
            names.append(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", relative))
    return sorted(names)


def _print_side_by_side(title: str, launcher: list[float], ray: list[float]) -> None:
    print(f"\n{title}\nstep  {'launcher (--nproc 2)':>22}  {'Ray Train (--workers 2)':>24}")
    for step, (a, b) in enumerate(zip(launcher, ray), 1):
        print(f"{step:4d}  {a:22.10f}  {b:24.10f}{'' if a == b else '  DIFFERENT'}")


@pytest.fixture(scope="module")
def launcher_runs(tmp_path_factory, cache) -> dict:
    """`moe train --nproc 2` at EP=1 and EP=2: {ep: (out_dir, output)}."""
    runs = {}
    for ep, extra in ((1, []), (2, EP2)):
        out_dir = tmp_path_factory.mktemp(f"launcher-ep{ep}") / "run"
        result = _moe_train(out_dir, cache, "--nproc", "2", extra=extra)
        runs[ep] = (out_dir, result.stdout + result.stderr)
    return runs


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, cache) -> tuple[Path, str]:
    """`moe train --ray --workers 2` at EP=1, undisturbed, on a local Ray started by the command."""
    out_dir = tmp_path_factory.mktemp("ray-ep1") / "run"
    result = _moe_train(out_dir, cache, "--ray", "--workers", "2")
    return out_dir, result.stdout + result.stderr


@pytest.mark.slow
def test_ray_train_logs_the_launchers_losses_files_and_progress(launcher_runs, ray_run):
    launcher_dir, launcher_output = launcher_runs[1]
    ray_dir, ray_output = ray_run
    _print_side_by_side("EP=1: train/loss per step", _losses(launcher_dir), _losses(ray_dir))
    assert [r["step"] for r in records(ray_dir, "train")] == list(range(1, STEPS + 1))
    assert _losses(ray_dir) == _losses(launcher_dir)
    assert _files(ray_dir) == _files(launcher_dir)  # config.yaml, metrics.jsonl, tensorboard/, checkpoints/
    expected = [line.replace(str(launcher_dir), str(ray_dir)) for line in _progress(launcher_output)]
    assert len(expected) >= 8 and sorted(_progress(ray_output)) == sorted(expected), (expected, _progress(ray_output))
    assert "local Ray started" in ray_output
    # Ray Train published every checkpoint (a copy, under the same tag) and knows the last one
    published = sorted((ray_dir / "ray").glob("moe-train-*/step*"))
    assert [p.name for p in published] == sorted(p.name for p in (ray_dir / "checkpoints").glob("step*"))
    assert f"last published checkpoint {published[-1]}" in ray_output


def _published(out_dir: Path) -> list[str]:
    """The checkpoints Ray Train has registered (its run state, written after each one)."""
    tags = []
    for snapshot in (out_dir / "ray").glob("moe-train-*/checkpoint_manager_snapshot.json"):
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten
            continue
        tags += [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]
    return tags


def _last_step(out_dir: Path) -> int:
    try:
        return max((r["step"] for r in records(out_dir, "train")), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def _workers(driver_pid: int, out_dir: Path) -> dict[str, int]:
    """{"rank0": pid, "other": pid} of the Ray Train workers under the driver (its local Ray); rank 0
    is the one writing metrics.jsonl."""
    found = {}
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" not in " ".join(proc.cmdline()):
                continue
            writing = any(f.path == str(out_dir / "metrics.jsonl") for f in proc.open_files())
            found["rank0" if writing else "other"] = proc.pid
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_published_checkpoint_and_ends_like_an_undisturbed_run(
        ray_run, launcher_runs, tmp_path, cache):
    out_dir = tmp_path / "run"
    log = tmp_path / "driver.log"
    command = [sys.executable, "-m", "launch.cli", "train", "--config", str(TINY), "--ray", "--workers", "2",
               "--max-failures", "1", *_sets(out_dir, cache)]
    with log.open("w") as sink:
        driver = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (_published(out_dir) and _last_step(out_dir) >= 7) and time.time() < deadline:
            assert driver.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        published_before, killed_at = _published(out_dir), _last_step(out_dir)
        workers = _workers(driver.pid, out_dir)
        assert published_before and killed_at < STEPS, (published_before, killed_at)
        assert set(workers) == {"rank0", "other"}, workers
        os.kill(workers["other"], signal.SIGKILL)  # a lost worker: no chance to save or say goodbye
        # Training went on while the workers were looked up, so what was published by the kill is read
        # after it: a second later, so that a checkpoint whose reports were all in by then is listed (no
        # new one can come until the restarted workers have loaded one and trained save_every steps).
        time.sleep(1.0)
        published_before, killed_at = _published(out_dir), _last_step(out_dir)
        code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    output = log.read_text()
    assert code == 0, output[-4000:]
    resumed = re.findall(r"resuming from checkpoint (\S+) \(step (\d+)\)", output)
    assert len(resumed) == 1, output[-4000:]
    folder, step = Path(resumed[0][0]), int(resumed[0][1])
    # resumed from Ray Train's published copy of a checkpoint published before the kill
    assert folder.parent.parent == out_dir / "ray" and folder.name in published_before and step <= killed_at
    assert not psutil.pid_exists(workers["other"]) or psutil.Process(workers["other"]).status() == psutil.STATUS_ZOMBIE
    undisturbed, launcher = _losses(ray_run[0]), _losses(launcher_runs[1][0])
    losses = _losses(out_dir)
    print(f"\nworker (pid {workers['other']}) killed after step {killed_at}; resumed from {folder.name} (step {step})")
    print(f"final loss: disturbed Ray run {losses[-1]:.10f}, undisturbed Ray run {undisturbed[-1]:.10f}, "
          f"launcher {launcher[-1]:.10f}")
    assert [r["step"] for r in records(out_dir, "train")] == list(range(1, STEPS + 1))  # the lost steps redone once
    assert losses[-1] == undisturbed[-1] and losses == undisturbed


@pytest.mark.slow
def test_ray_job_submit_trains_with_expert_parallelism_like_the_launcher(launcher_runs, tmp_path, cache, monkeypatch):
    """The EP=2 comparison runs as a Ray job: `ray job submit -- moe train --ray --workers 2` on a
    `ray start --head` with token authentication; the Jobs API (the dashboard's) lists the job."""
    launcher_dir, launcher_output = launcher_runs[2]
    out_dir = tmp_path / "run"
    from torch.utils.cpp_extension import get_default_build_root

    # the head's HOME is its own (its token): the C++ expert kernel's build stays where it is
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    with ray_head(tmp_path) as (env, address, bin_dir):
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                  "moe", "train", "--config", "configs/tiny.yaml", "--ray", "--workers", "2",
                  *_sets(out_dir, cache, EP2)]
        env = dict(env, OMP_NUM_THREADS="1")
        result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        listed = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                                capture_output=True, text=True, timeout=60)
        without_token = dict(env, HOME=str(tmp_path))  # authentication stays on: no token, no job
        refused = subprocess.run(submit, cwd=REPO, env=without_token, capture_output=True, text=True, timeout=120)
    assert "succeeded" in output
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout and "moe train" in listed.stdout, listed.stdout
    assert refused.returncode != 0 and "token" in refused.stdout + refused.stderr, refused.stdout[-2000:]
    _print_side_by_side("EP=2: train/loss per step", _losses(launcher_dir), _losses(out_dir))
    assert _losses(out_dir) == _losses(launcher_dir)
    assert _files(out_dir) == _files(launcher_dir)
    expected = [line.replace(str(launcher_dir), str(out_dir)) for line in _progress(launcher_output)]
    assert sorted(_progress(output)) == sorted(expected), (expected, _progress(output))  # stdout and stderr interleave


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, message", [
    (["--ray", "--nproc", "2"], "--nproc belong(s) to the deepspeed launcher"),
    (["--ray", "--hostfile", "hosts"], "--hostfile belong(s) to the deepspeed launcher"),
    (["--ray", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "2"], "--workers only apply to Ray Train runs: add --ray"),
    (["--ray", "--gpus-per-worker", "2"], "--gpus-per-worker 2 is invalid: expected 0 or 1"),
    (["--ray", "--max-failures", "-2"], "--max-failures must be >= -1"),
    (["--ray", "--workers", "3", "--set", "parallel.expert_parallel_size=2"],
     "parallel.expert_parallel_size=2 is invalid: it must divide the number of ranks (--workers 3)"),
])
def test_bad_flags_are_one_clear_error(flags, message, tmp_path, cache, capsys):
    code = moe_main(["train", "--config", str(TINY), *flags, *_sets(tmp_path / "run", cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unreachable_ray_address_fails_within_seconds(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start = time.monotonic()
    code = moe_main(["train", "--config", str(TINY), "--ray", "--workers", "2", "--ray-address",
                     f"127.0.0.1:{free_port()}", *_sets(tmp_path / "run", cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "cannot reach a Ray cluster at '127.0.0.1:" in err[-1], err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_local_ray_without_the_gpus_asked_for_is_one_clear_error(tmp_path, cache):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launch.cli", "train", "--config", str(TINY), "--ray", "--workers", "2",
               "--gpus-per-worker", "1", *_sets(out_dir, cache)]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-3000:]
    assert last.startswith("moe train: error: the Ray cluster cannot hold --workers 2: 2 x 1 GPU (it has 0)"), last
    assert "Traceback" not in result.stderr and not (out_dir / "checkpoints").exists()
