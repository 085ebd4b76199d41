"""parallel.engine: process-group lifetime."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.runs import REPO, rank_env

CHILD = textwrap.dedent(
    """
    import atexit
    import torch.distributed as dist
    from parallel.engine import init_distributed

    # atexit runs handlers last-in first-out: this one runs after any init_distributed registers
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    rank, world = init_distributed()
    print("rank", rank, "of", world, "initialized:", dist.is_initialized(), flush=True)
    """
)


def test_the_process_group_is_destroyed_before_the_interpreter_exits():
    """A gloo group left to the C++ static destructors makes ranks abort at exit now and then
    (exit -6 after finishing their work); init_distributed destroys it in an atexit hook."""
    env = {k: v for k, v in rank_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "rank 0 of 1 initialized: True" in result.stdout, result.stdout
    assert "initialized at exit: False" in result.stdout, result.stdout


def test_cuda_arch_lists_with_arch_specific_suffixes_are_made_readable_for_deepspeed():
    from parallel.engine import normalize_cuda_arch_list

    for value, expected in (("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"), ("9.0a 10.0f", "9.0;10.0"),
                            ("8.6,9.0a", "8.6;9.0"), ("9.0;9.0a", "9.0")):
        env = {"TORCH_CUDA_ARCH_LIST": value}
        assert normalize_cuda_arch_list(env) == expected and env["TORCH_CUDA_ARCH_LIST"] == expected, value
    for value in ("9.0", "8.0;9.0+PTX"):
        env = {"TORCH_CUDA_ARCH_LIST": value}
        assert normalize_cuda_arch_list(env) is None and env["TORCH_CUDA_ARCH_LIST"] == value
    assert normalize_cuda_arch_list({}) is None


def test_deepspeed_parses_the_normalized_arch_list(monkeypatch):
    """DeepSpeed's own op builder reads the normalized value (the raw "9.0a" made it raise)."""
    import os

    import pytest
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    from parallel.engine import normalize_cuda_arch_list

    class Probe(CUDAOpBuilder):
        def __init__(self):
            super().__init__(name="probe")

        def absolute_name(self):
            return "probe"

        def sources(self):
            return []

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    with pytest.raises(ValueError, match="invalid literal for int"):
        Probe().compute_capability_args()
    normalize_cuda_arch_list(os.environ)
    args = Probe().compute_capability_args()
    assert any("compute_90" in a for a in args) and any("compute_80" in a for a in args), args


def test_the_optimizer_on_cuda_is_torchs_fused_adamw_and_builds_nothing(monkeypatch):
    """On CUDA the engine's AdamW is torch's fused one (prebuilt), never DeepSpeed's JIT-built
    FusedAdam; on CPU torch's AdamW as before."""
    import parallel.engine as engine
    from launch.config import load_run_config

    train = load_run_config(REPO / "configs" / "tiny.yaml").train
    monkeypatch.setattr(engine, "device_type", lambda: "cuda")
    params = engine.deepspeed_config({}, train, 1)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    monkeypatch.setattr(engine, "device_type", lambda: "cpu")
    params = engine.deepspeed_config({}, train, 1)["optimizer"]["params"]
    assert params["torch_adam"] is True and "fused" not in params


ENGINE_CHILD = textwrap.dedent(
    """
    import torch, deepspeed.ops.op_builder.builder as builder
    import parallel.engine as engine
    from launch.config import load_run_config
    from moe import MoETransformer

    def no_build(*args, **kwargs):
        raise AssertionError("DeepSpeed tried to build an op")

    builder.OpBuilder.load = no_build
    builder.OpBuilder.jit_load = no_build
    engine.init_distributed()
    cfg = load_run_config("configs/tiny.yaml", ["model.num_layers=1", "train.precision=fp32"])
    real = engine.device_type
    engine.device_type = lambda: "cuda"  # the config a CUDA rank gets: fused AdamW
    config = engine.deepspeed_config(cfg.deepspeed, cfg.train, 1)
    engine.device_type = real
    engine.deepspeed_config = lambda *a: config
    ds = engine.build_engine(MoETransformer(cfg.model), cfg.deepspeed, cfg.train)
    inner = ds.optimizer.optimizer if hasattr(ds.optimizer, "optimizer") else ds.optimizer
    print("optimizer", type(inner).__module__, type(inner).__name__, "fused", inner.defaults.get("fused"))
    """
)


def test_an_engine_with_the_cuda_optimizer_config_is_torchs_fused_adamw():
    """The same config a CUDA rank gets, on a real engine (torch's fused AdamW also runs on CPU):
    DeepSpeed hands it to torch.optim.AdamW(fused=True) and builds no op."""
    env = {k: v for k, v in rank_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", ENGINE_CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "optimizer torch.optim.adamw AdamW fused True" in result.stdout, result.stdout[-2000:]


def test_a_failed_deepspeed_op_build_is_one_user_error_naming_what_to_set(tmp_path, monkeypatch):
    import importlib

    import pytest

    from moe.errors import UserError
    from parallel.engine import _op_build_failures_explained

    (tmp_path / "op_builder").mkdir()
    (tmp_path / "op_builder" / "fake_builder.py").write_text(
        "def build():\n    int('0a')  # what DeepSpeed's compute_capability_args did with 9.0a\n")
    monkeypatch.syspath_prepend(str(tmp_path / "op_builder"))
    fake = importlib.import_module("fake_builder")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(UserError, match=r"could not build one of its ops .*TORCH_CUDA_ARCH_LIST.*'9.0a'"):
        with _op_build_failures_explained():
            fake.build()
    with pytest.raises(KeyError):  # anything else keeps its own type and traceback
        with _op_build_failures_explained():
            {}["missing"]
