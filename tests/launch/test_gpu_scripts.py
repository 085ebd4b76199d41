"""The GPU machine's scripts, checked here without a GPU: scripts/gpu_wheelhouse.sh and
scripts/gpu_check.sh parse, gpu_check.sh stops at once with one line where there is no CUDA GPU,
its steps run, time out, fail and skip as they should (with a stand-in interpreter that fakes the
GPU and the project's commands), and scripts/gpu_report.py writes the report and picks the wheels
to install. No network, a few seconds."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _load_report():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPTS / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module
    spec.loader.exec_module(module)
    return module


report = _load_report()


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k not in ("OUT", "WHEELHOUSE")}
    env.update(changes)
    return env


@pytest.mark.parametrize("script", ["gpu_wheelhouse.sh", "gpu_check.sh"])
def test_scripts_parse(script):
    result = subprocess.run([BASH, "-n", str(SCRIPTS / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_gpu_check_stops_with_one_line_without_a_cuda_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    result = subprocess.run([BASH, str(SCRIPTS / "gpu_check.sh")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env=_env(PYTHON=sys.executable, GPU_CHECK_DIR=str(tmp_path / "work")))
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpu_check: no CUDA GPU"), lines[0]
    assert not (tmp_path / "work").exists()  # nothing ran, nothing was written


# A stand-in for python3 on the GPU machine: it reports a GPU, has deepspeed, lacks megatron-core,
# passes pytest, trains tiny (printing the summary lines), fails the export, and hangs in the
# gpu_example run; everything else goes to the real interpreter. Each call's arguments are logged.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_CALLS"
case "$1 $2" in
"scripts/gpu_report.py device") printf 'Fake GPU 80GB HBM3\tfake-gpu-80gb-hbm3\tsm_90, 132 SMs\n'; exit 0 ;;
"-c import deepspeed") exit "${FAKE_NO_DEEPSPEED:-0}" ;;
"-c import megatron.core") exit 1 ;;
"-m pytest") printf 'collected\n...\n12 passed, 3 deselected in 1.00s\n'; exit 0 ;;
"-m launch.cli")
    case "$3" in
    bench) echo "bench table"; exit 0 ;;
    train)
        if [[ "$*" == *gpu_example* ]]; then echo "training ..."; exec sleep 30; fi
        printf 'train:  50%%|##   | 150/300\rtrain: 100%%|#####| 300/300\n'
        printf 'done: steps 0..300 on 1 rank(s)\ntraining tokens/s (all ranks): median 71,000 over 30 log windows\n'
        printf 'MFU 12.5%% of 989 TFLOP/s\n'
        exit 0 ;;
    export) echo "Traceback (most recent call last):"; echo "RuntimeError: no checkpoint"; exit 1 ;;
    esac ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def _fake_python(tmp_path) -> Path:
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


def test_gpu_check_without_deepspeed_or_wheels_says_what_to_carry(tmp_path):
    fake = _fake_python(tmp_path)
    env = _env(PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_CALLS=str(tmp_path / "calls.txt"),
               FAKE_NO_DEEPSPEED="1", WHEELHOUSE=str(tmp_path / "no-wheels"), GPU_CHECK_DIR=str(tmp_path / "work"))
    result = subprocess.run([BASH, str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "deepspeed cannot be imported" in lines[0] and "gpu_wheelhouse.sh" in lines[0], lines
    assert not (tmp_path / "work").exists()


def test_gpu_check_runs_times_out_fails_skips_and_reports(tmp_path):
    fake = _fake_python(tmp_path)
    calls, work, out = tmp_path / "calls.txt", tmp_path / "work", tmp_path / "out"
    md = tmp_path / "gpu-fake.md"
    env = _env(PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_CALLS=str(calls), GPU_CHECK_DIR=str(work),
               GPU_CHECK_REPORT=str(md), OUT=str(out), WHEELHOUSE=str(tmp_path / "no-wheels"),
               GPU_CHECK_LIMIT_EXAMPLE_TRAIN="1", GPU_CHECK_COMMIT="abc1234")
    result = subprocess.run([BASH, str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {s.name: s for s in report.read_steps(str(work / "steps.tsv"))}
    assert list(steps) == ["pytest", "bench", "tiny-train", "tiny-export", "tiny-eval", "tiny-slim",
                           "tiny-generate", "example-train"]
    assert {name: s.status for name, s in steps.items()} == {
        "pytest": "PASS", "bench": "PASS", "tiny-train": "PASS", "tiny-export": "FAIL", "tiny-eval": "SKIP",
        "tiny-slim": "SKIP", "tiny-generate": "SKIP", "example-train": "TIMEOUT"}
    assert steps["example-train"].seconds < 10  # SIGINT at 1 s ended it

    # What ran, and that everything a run writes goes under the work folder.
    ran = calls.read_text()
    assert "--ignore=tests/moe/test_peer_parity.py" in ran  # no megatron-core
    assert "-m pytest -q -m gpu tests/kernels tests/moe tests/launch tests/parallel/test_megatron.py -p no:cacheprovider" in ran
    assert (f"train --config configs/tiny.yaml --nproc 1 --set out_dir={work}/runs/tiny "
            f"--set data.cache_dir={work}/runs/cache") in ran
    assert "train.steps=60" in ran and "model.num_layers=8" in ran and "train.seq_len=1024" in ran
    assert f"data.cache_dir={work}/runs/cache" in ran.split("gpu_example.yaml", 1)[1]

    # Console: the final table and where the report is.
    assert "tiny-export    FAIL" in result.stdout
    assert "example-train  TIMEOUT" in result.stdout
    assert "3 of 8 steps passed" in result.stdout

    text = md.read_text()
    assert text.startswith("# GPU check: Fake GPU 80GB HBM3")
    assert "| commit | abc1234 |" in text
    assert "| tiny-eval | SKIP |" in text and "tiny-export did not pass" in text
    assert "MFU 12.5% of 989 TFLOP/s" in text and "median 71,000" in text
    assert "12 passed, 3 deselected" in text
    assert "train: 100%" in text and "train:  50%" not in text  # a redrawn bar: its last state only
    assert "--device cuda" in text and "--prompt 'def main('" in text
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-logs.tar.gz", md.name]
    with tarfile.open(out / "gpu-check-logs.tar.gz") as archive:
        names = archive.getnames()
    assert "steps.tsv" in names and "logs/04-tiny-export.log" in names


def test_gpu_check_perf_and_decode_groups_run_the_benchmarks_of_issue_17_into_their_own_report(tmp_path):
    fake = _fake_python(tmp_path)
    calls, work, checkout = tmp_path / "calls.txt", tmp_path / "work", tmp_path / "checkout"
    shutil.copytree(SCRIPTS, checkout / "scripts")  # the script writes benchmarks/ beside its own folder
    env = _env(PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_CALLS=str(calls), GPU_CHECK_DIR=str(work),
               WHEELHOUSE=str(tmp_path / "no-wheels"), GPU_CHECK_STEPS="perf,decode", GPU_CHECK_COMMIT="abc1234")
    result = subprocess.run([BASH, str(checkout / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {s.name: s.status for s in report.read_steps(str(work / "steps.tsv"))}
    assert steps == {"bench-layer": "PASS", "bench-step": "PASS", "decode-tiny": "PASS", "decode-example": "PASS"}
    ran = calls.read_text()
    for command in ("bench layer --json", "bench step --json", "bench decode --config configs/tiny.yaml --batch 8",
                    "bench decode --config configs/gpu_example.yaml --batch 1 --k 1,64"):
        assert f"-m launch.cli {command}" in ran, command
    assert [p.name for p in (checkout / "benchmarks").iterdir()] == ["gpu-fake-gpu-80gb-hbm3-perf-decode.md"]


def _step(tmp_path, name, status, seconds, text, note=""):
    log = tmp_path / f"{name}.log"
    log.write_text(text)
    return "\t".join([name, status, str(seconds), "240", "0" if status == "PASS" else "1", str(log),
                      f"python3 -m {name}", note])


def test_report_from_a_step_list(tmp_path):
    long_log = "".join(f"line {i}\n" for i in range(200)) + "\x1b[32m5 passed\x1b[0m, 1 failed in 3.2s\n"
    tsv = tmp_path / "steps.tsv"
    tsv.write_text("\n".join([
        _step(tmp_path, "pytest", "FAIL", 212.4, long_log),
        _step(tmp_path, "train", "PASS", 31.0, "a ``` fence\ntraining tokens/s (all ranks): median 1\nMFU 40%\n"),
        _step(tmp_path, "export", "SKIP", 0, "", note="skipped: train did not pass"),
    ]) + "\n")
    out = tmp_path / "deep" / "gpu-x.md"
    assert report.main(["write", "--steps", str(tsv), "--out", str(out), "--device", "Fake GPU",
                        "--details", "sm_90", "--commit", "0123abc", "--date", "2026-11-27 10:00 UTC"]) == 0
    text = out.read_text()
    assert "| date | 2026-11-27 10:00 UTC |" in text
    assert "| device | Fake GPU (sm_90) |" in text
    assert "| torch |" in text and "| triton |" in text and "| deepspeed |" in text
    assert "| result | 1 of 3 steps passed in 243 s |" in text
    assert "| pytest | FAIL | 212.4 | 240 |" in text
    assert "## pytest: FAIL, 212.4 s" in text
    assert "line 139\n" not in text and "line 141\n" in text  # the last 60 lines of 201
    assert "Output (last 60 of 201 lines)" in text
    assert "5 passed, 1 failed in 3.2s" in text and "\x1b" not in text
    assert "````text\na ``` fence" in text  # the fence outgrows the backticks inside
    assert "Key lines:" in text and "MFU 40%" in text
    assert "## export: SKIP" in text and "(no output)" in text

    table = report.table(report.read_steps(str(tsv)))
    assert table.splitlines()[1].split()[:3] == ["pytest", "FAIL", "212.4"]
    assert table.splitlines()[-1] == "1 of 3 steps passed in 243 s"


def _wheel(folder: Path, dist: str, version: str, requires=()) -> Path:
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        lines = [f"Name: {dist}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{dist}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_plan_wheels_installs_what_is_missing_old_or_pinned(tmp_path):
    missing = _wheel(tmp_path, "surely_not_installed_pkg", "1.0",
                     ["tqdm==0.0.1", "pytest>=1.0", "numpy>=0.1; extra == 'x'"])
    pinned = _wheel(tmp_path, "tqdm", "0.0.1")          # installed, but the missing one pins another version
    newer = _wheel(tmp_path, "pytest", "99999.0")       # installed, older than this wheel
    _wheel(tmp_path, "numpy", "0.1")                    # installed and newer: left alone
    paths, reasons = report.plan_wheels(str(tmp_path))
    assert sorted(paths) == sorted(map(str, [missing, pinned, newer]))
    assert any("cannot be imported" in r for r in reasons)
    assert any("needs tqdm==0.0.1" in r for r in reasons)


def test_slug_matches_bench_kernels():
    from launch.bench.kernels import gpu_slug

    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "Tesla V100-SXM2-16GB"):
        assert report.slug(name) == gpu_slug(name)
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
