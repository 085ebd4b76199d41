"""Every test starts from the same random state, so a failure always reproduces."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU tensors (fp32, tiny shapes). Set before
    # anything imports triton: the interpreter is chosen when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _default_triton_configs(monkeypatch):
    """On a GPU, autotuning every shape of every test would take many minutes (each candidate
    compiles): tests run the kernels' default configs. The tests of the autotuner itself, and of
    every candidate config, switch it back on or force each config."""
    monkeypatch.setenv("SLIMMOE_TRITON_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One tokenised-corpus cache for every test that trains (the corpus is tokenised once)."""
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, cache):
    """``configs/tiny.yaml`` trained 80 steps in one process (k has grown to 4 of 8 by then) and
    exported: a small model whose embeddings, experts and routing have been trained. Read-only for
    the tests that share it."""
    import subprocess
    import sys

    from launch.export import export_checkpoint
    from tests.runs import TINY, rank_env, set_args

    run = tmp_path_factory.mktemp("tiny-run")
    sets = set_args([f"out_dir={run}", f"data.cache_dir={cache}", "train.steps=80", "train.eval_every=0",
                     "train.save_every=80", "train.log_every=20"])
    result = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(TINY), *sets],
                            env=rank_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return export_checkpoint(str(run / "checkpoints"), str(run / "export"))


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored afterwards): on tiny shapes faster than two
    contending ones. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
