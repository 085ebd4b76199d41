"""A real Ray cluster for tests of `ray job submit`: `ray start --head --block` with token
authentication on, in a HOME of its own (its token stays apart from the user's), on free ports,
stopped by its PID (never `ray stop`, which stops every Ray of the user)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from parallel.engine import free_port
from tests.runs import REPO


@contextmanager
def ray_head(tmp_path: Path, num_cpus: int = 2):
    """Yields (env, dashboard address, bin folder): ``env`` is the head's environment (its HOME holds
    the token), for `ray job ...` commands; the address is the Jobs API's (``http://127.0.0.1:PORT``)."""
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{bin_dir}:{os.environ['PATH']}",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert head.poll() is None, head.stdout.read()[-3000:]
        time.sleep(1)
    else:
        head.terminate()
        pytest.fail("the Ray head did not come up within 90 s")
    try:
        yield env, address, bin_dir
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
