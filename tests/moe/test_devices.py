"""moe.devices: where a loaded model runs, and how commands name the device."""

from __future__ import annotations

import types

import pytest
import torch

from moe.devices import describe_device, resolve_device
from moe.errors import UserError


def test_the_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    assert resolve_device() == resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device())
                                                          if torch.cuda.is_available() else torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device() == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_a_device_this_machine_lacks_is_one_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(UserError, match="invalid"):
            resolve_device(bad)


def test_tables_name_the_device():
    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


def test_eval_on_a_missing_gpu_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from launch.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--model", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0], err


def test_calibration_runs_on_the_clusters_gpus_unless_told_otherwise():
    from launch.quantize.cluster import GPUS_PER_TASK, MODEL_TASKS, Cluster, calibration_device

    def cluster(gpus):
        return types.SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, **({"GPU": gpus} if gpus else {})})

    assert calibration_device(cluster(1), "auto") == calibration_device(cluster(1), None) == "cuda"
    assert calibration_device(cluster(0), "auto") == "cpu"
    assert calibration_device(cluster(1), "cpu") == "cpu"
    with pytest.raises(UserError, match="no GPU"):
        calibration_device(cluster(0), "cuda")
    with pytest.raises(UserError, match="invalid"):
        calibration_device(cluster(1), "tpu")

    submitted = {}

    class FakeRay:
        def remote(self, **options):
            def wrap(fn):
                submitted[fn.__name__] = options
                return types.SimpleNamespace(remote=lambda *args: (fn.__name__, args))
            return wrap

    gpu = Cluster(FakeRay(), "cuda")
    assert all(submitted[name]["num_gpus"] == GPUS_PER_TASK for name in MODEL_TASKS)
    assert "num_gpus" not in submitted["_embed_task"]
    assert gpu.submit("_solve_task", "w", "h")[1][-1] == "cuda"  # model tasks are told their device
    assert gpu.submit("_embed_task", "w", "ids")[1] == ("w", "ids")
    Cluster(FakeRay(), "cpu")
    assert all("num_gpus" not in options for options in submitted.values())
