"""Helpers for tests that start real ranks: the deepspeed launcher on CPU (gloo), two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from parallel.engine import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def rank_env() -> dict:
    """The environment of launched ranks. Without TRITON_INTERPRET (set for this process by
    tests/conftest.py): ranks run no Triton kernel. (Ranks that aborted at exit after finishing,
    "terminate called without an active exception", did so with or without it: their gloo group
    was never destroyed. ``parallel.engine.init_distributed`` now destroys it at exit.)"""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def set_args(assignments) -> list[str]:
    args = []
    for assignment in assignments:
        args += ["--set", assignment]
    return args


def deepspeed_launch(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N ARGS``: the launcher script itself, as a user types it. Fails the
    test with the ranks' output when the launcher exits non-zero."""
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc),
               "--master_port", str(free_port()), *args]
    result = subprocess.run(command, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_under_launcher(out_dir: Path, cache: Path, assignments=(), *extra_args: str) -> subprocess.CompletedProcess:
    """tiny.yaml on 2 ranks under the deepspeed launcher, writing to ``out_dir``."""
    sets = set_args([f"out_dir={out_dir}", f"data.cache_dir={cache}", *assignments])
    return deepspeed_launch("--module", "launch.train", "--config", str(TINY), *sets, *extra_args)


def records(out_dir: Path, event: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]
