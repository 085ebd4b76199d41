"""`moe quantize` over Ray: the layer-by-layer pipeline against an in-process reference written
without Ray, blocks or shards; the quantized export; a killed worker; an interrupted job that
resumes; bad addresses and paths; a real `ray start --head` cluster taking a `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moe
from launch.cli import main
from launch.quantize.cluster import ray_session
from launch.quantize.job import QuantizeOptions, quantize_model
from moe.quant import QuantSpec, gptq
from moe.quant.calibrate import set_target_weight, stage_targets, target_weight
from parallel.engine import free_port
from tests.launch.ray_cluster import ray_head as start_ray_head
from tests.runs import REPO

# Small enough for CI: 8 calibration sequences of 64 tokens, the model routed at k = 2.
SMALL = ["--experts", "2", "--num-sequences", "8", "--seq-len", "64", "--shards", "2"]


def small_options(**changes) -> QuantizeOptions:
    values = dict(method="gptq", bits=4, calib="random", agq=True, experts=2, num_sequences=8, seq_len=64, shards=2)
    return QuantizeOptions(**{**values, **changes})


@pytest.fixture(scope="module")
def reference(tiny_export, tmp_path_factory):
    """One undisturbed GPTQ + AGQ quantization on an embedded 2-CPU Ray."""
    out = tmp_path_factory.mktemp("quant") / "gptq-agq"
    with ray_session(None, num_cpus=2):
        result = quantize_model(str(tiny_export), str(out), small_options(), progress=False)
    return result, out


def _cli_env(tmp_path: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HOME=str(tmp_path))


def _quantize_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "quantize", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# ------------------------------------------------------------------------------------------------
# The pipeline against a reference without Ray
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_gptq(model, input_ids: torch.Tensor, spec: QuantSpec, agq: bool) -> None:
    """GPTQ (+ AGQ) of the whole model in this process, in place: for each block and stage, run the
    *whole* model on the calibration set with hooks, build each Hessian as X^T diag(c) X from the
    collected rows (experts' rows found from the router's top-k, not from the dispatcher), solve,
    write the weights back."""
    config = model.config
    for layer_idx, block in enumerate(model.blocks):
        for stage in (1, 2):
            targets = stage_targets(config, layer_idx, stage)
            if not targets:
                continue
            rows: dict[str, list] = defaultdict(list)
            hooks = []
            if stage == 1:
                named = {"attn.qkv": block.attn.qkv, "attn.out": block.attn.out, "router": block.ffn.router}
                for key, module in named.items():
                    hooks.append(module.register_forward_pre_hook(
                        lambda m, args, key=key, rows=rows: rows[key].append(args[0].reshape(-1, args[0].shape[-1]))))
            else:
                hooks.append(block.ffn.register_forward_pre_hook(lambda m, args, rows=rows: rows["ffn"].append(args[0])))
            model(input_ids)
            for hook in hooks:
                hook.remove()
            hessians = {}
            if stage == 1:
                for key, parts in rows.items():
                    x = torch.cat(parts).double()
                    hessians[key] = x.T @ x
            else:
                x = torch.cat([p.reshape(-1, p.shape[-1]) for p in rows["ffn"]]).double()  # [T, d]
                routing = block.ffn.last_routing
                experts = block.ffn.experts
                for e in range(config.moe.num_experts):
                    hit = routing.indices == e  # [T, k]
                    token = hit.any(dim=1)
                    c = (routing.weights.double() * hit).sum(dim=1)[token] if agq else torch.ones(int(token.sum())).double()
                    xe = x[token]
                    mid = torch.nn.functional.silu(xe @ experts.w1[e].double()) * (xe @ experts.w3[e].double())
                    hessians[f"experts.in.{e}"] = xe.T @ (c[:, None] * xe)
                    hessians[f"experts.mid.{e}"] = mid.T @ (c[:, None] * mid)
            state = model.state_dict()
            for target in targets:
                result = gptq(target_weight(state, target), hessians[target.hessian].float(), spec)
                set_target_weight(state, target, result.dequantize())


def test_pipeline_matches_a_reference_without_ray(reference, tiny_export):
    """The Ray pipeline (standalone blocks, 2 shards, summed partial Hessians, GroupedRows hooks)
    quantizes like the whole-model reference: the same weights up to rare rounding ties."""
    result, out = reference
    assert result.ray_tasks > 0 and result.label == "GPTQ + AGQ"
    expected = moe.load_pretrained(tiny_export)
    moe.set_active_experts(expected, 2)
    from launch.quantize.job import make_calibration

    meta = json.loads((Path(tiny_export) / "config.json").read_text())
    calibration = make_calibration(expected, meta, small_options(), None)
    reference_gptq(expected, calibration, QuantSpec(bits=4), agq=True)
    got = moe.load_pretrained(out)
    assert got.quantization["spec"]["bits"] == 4
    agree, total = 0, 0
    expected_state, got_state = expected.state_dict(), got.state_dict()
    for name, want in expected_state.items():
        have = got_state[name]
        if name in got.quantization["tensors"]:
            close = torch.isclose(have, want, rtol=0, atol=1e-6)
            agree, total = agree + int(close.sum()), total + close.numel()
        else:
            assert torch.equal(have, want), name  # norms, embeddings: untouched
    assert agree / total > 0.995, f"only {agree / total:.4%} of quantized weights match the reference"
    ids = calibration[:4]
    assert torch.allclose(got(ids), expected(ids), atol=0.05)


def test_quantized_export_is_packed_on_the_grid_and_runs(reference, tiny_export, capsys):
    _, out = reference
    meta = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    spec = meta["quantization"]["spec"]
    assert meta["quantization"]["method"] == "gptq" and meta["data"]  # the eval corpus travels with it
    assert len(meta["quantization"]["tensors"]) == 4 * (3 + 3)  # per block: qkv, out, router, w1, w3, w2
    w1 = "blocks.0.ffn.experts.w1"
    assert tensors[f"{w1}.qweight"].dtype == torch.uint8 and tensors[f"{w1}.qweight"].shape == (8, 128, 64)  # 2 per byte
    assert w1 not in tensors
    model = moe.load_pretrained(out)
    weight = model.blocks[1].attn.qkv.weight  # [out, in]: at most 2^bits values per row (one group per row)
    assert max(len(torch.unique(row)) for row in weight) <= 2 ** spec["bits"]
    assert (out / "model.safetensors").stat().st_size < 0.45 * (Path(tiny_export) / "model.safetensors").stat().st_size
    ids = torch.randint(0, 256, (1, 5))
    assert model.generate(ids, 4, active_experts=2, temperature=0).shape == (1, 9)
    assert main(["eval", "--model", str(out), "--tokens", "128", "--batch-size", "2", "--k", "2"]) == 0
    assert "val loss" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(str(out), str(out.parent / "again"), small_options(method="rtn", agq=False))


def test_rtn_and_errors(tiny_export, tmp_path, capsys):
    result = quantize_model(str(tiny_export), str(tmp_path / "rtn"), small_options(method="rtn", agq=False, bits=8))
    assert result.ray_tasks == 0
    fp, q8 = moe.load_pretrained(tiny_export), moe.load_pretrained(tmp_path / "rtn")
    w_fp, w_q = fp.blocks[0].ffn.experts.w2, q8.blocks[0].ffn.experts.w2
    assert 0 < (w_fp - w_q).abs().max() < w_fp.abs().max() / 100  # 8 bits: close, but quantized
    with pytest.raises(ValueError, match="already holds an exported model"):
        quantize_model(str(tiny_export), str(tmp_path / "rtn"), small_options(method="rtn", agq=False))
    (tmp_path / "not-an-export").mkdir()
    assert main(["quantize", "--model", str(tmp_path / "not-an-export"), "--out", str(tmp_path / "x")]) == 2
    assert "is not an exported model" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_export), "--out", str(tiny_export), "--overwrite"]) == 2
    assert "is --model" in capsys.readouterr().err  # never the model's own folder (more in tests/launch/test_paths.py)
    assert main(["quantize", "--model", str(tiny_export), "--out", str(tmp_path / "x"), "--bits", "9"]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_export), "--out", str(tmp_path / "x"), "--method", "rtn", "--agq"]) == 2
    assert "--agq" in capsys.readouterr().err


def test_an_unreachable_ray_address_fails_within_seconds(tiny_export, tmp_path, capsys):
    port = free_port()  # nothing listens there
    start = time.perf_counter()
    code = main(["quantize", "--model", str(tiny_export), "--out", str(tmp_path / "q"), "--ray-address",
                 f"127.0.0.1:{port}", *SMALL])
    assert code == 2 and time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert f"cannot reach a Ray cluster at '127.0.0.1:{port}'" in err and err.count("\n") == 1
    assert main(["quantize", "--model", str(tiny_export), "--out", str(tmp_path / "q"), "--ray-address",
                 "http://127.0.0.1:8265"]) == 2
    assert "dashboard" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Faults: a killed worker, an interrupted job
# ------------------------------------------------------------------------------------------------


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(reference, tiny_export, tmp_path):
    _, expected = reference
    marker = tmp_path / "killed"
    env = dict(_cli_env(tmp_path), MOE_QUANT_FAULT_KILL_ONCE=str(marker))
    result = _quantize_cli("--model", str(tiny_export), "--out", str(tmp_path / "q"), "--agq", "--ray-cpus", "2",
                           *SMALL, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert marker.exists()  # a task's worker process really was SIGKILLed (it writes the marker, then dies)
    _same_tensors(expected, tmp_path / "q")


def _ray_processes_of(pid: int) -> list[str]:
    """Command lines of the processes of the local Ray that the process ``pid`` started (its session
    folder ends with the driver's pid)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"_{pid}/" in cmdline and "session_" in cmdline:
            found.append(cmdline[:200])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_job_resumes_after_its_last_finished_block(reference, tiny_export, tmp_path, signum):
    """Ctrl-C or SIGTERM (a scheduler, `kill`, a preempted node) while block 1 or later is being
    calibrated: Ray is shut down, one line says how to resume, the exit status is 128 + the signal;
    the same command again resumes after the finished blocks and gives the undisturbed result."""
    _, expected = reference
    out = tmp_path / "q"
    command = [sys.executable, "-m", "launch.cli", "quantize", "--model", str(tiny_export), "--out", str(out), "--agq",
               "--ray-cpus", "2", *SMALL]
    job = subprocess.Popen(command, cwd=REPO, env=_cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    first_block = out / ".partial" / "block_0000.safetensors"
    deadline = time.time() + 240
    while not first_block.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(signum)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signum, stdout[-2000:] + stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    name = signal.Signals(signum).name
    assert lines[-1] == (f"moe quantize: stopped by {name}; finished blocks are kept in {out / '.partial'}, run the "
                         f"same command again to resume"), stderr[-3000:]
    for crash in ("Traceback", "Aborted", "core dumped", "SIGABRT", "*** "):
        assert crash not in stderr, stderr[-3000:]
    assert not _ray_processes_of(job.pid)  # the local Ray it started is shut down
    assert not (out / "config.json").exists()  # no export from a half-done job
    done = sorted(p.name for p in (out / ".partial").glob("block_*.safetensors"))
    assert done and len(done) < 4, done
    result = _quantize_cli("--model", str(tiny_export), "--out", str(out), "--agq", "--ray-cpus", "2", *SMALL,
                           env=_cli_env(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"{len(done)} blocks resumed" in result.stdout
    assert not (out / ".partial").exists()
    _same_tensors(expected, out)


def test_other_settings_do_not_resume_a_partial_job(tmp_path):
    from launch.quantize.job import Progress

    Progress(tmp_path, {"bits": 4}, overwrite=False)
    with pytest.raises(ValueError, match=r"unfinished quantization with other settings \(bits\)"):
        Progress(tmp_path, {"bits": 3}, overwrite=False)
    Progress(tmp_path, {"bits": 3}, overwrite=True)  # discards it


# ------------------------------------------------------------------------------------------------
# A real Ray cluster and the Jobs API
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` with token authentication, in a HOME of its own; stopped by PID."""
    with start_ray_head(tmp_path) as head:
        yield head


def test_ray_job_submit_quantizes_the_tiny_model(ray_head, tiny_export, tmp_path):
    env, address, bin_dir = ray_head
    out = tmp_path / "q"
    result = subprocess.run(
        [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "moe", "quantize", "--model", str(tiny_export), "--out", str(out), "--calib", "ebss", "--agq", *SMALL],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert "Ray tasks" in result.stdout
    model = moe.load_pretrained(out)
    assert model.quantization["options"]["calib"] == "ebss" and model.quantization["ray_tasks"] > 0
    without_token = dict(env, HOME=str(tmp_path))  # authentication stays on: no token, no job
    refused = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=without_token,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def test_compare_writes_the_table(tiny_export, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["quantize", "--compare", "--model", str(tiny_export), "--out", str(out), "--bits", "4", "--ray-cpus", "2",
            "--eval-tokens", "512", *SMALL]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["FP", "RTN", "GPTQ", "GPTQ + EBSS", "GPTQ + AGQ", "GPTQ + EBSS + AGQ", "GPTQ + EBSS + AGQ + EoRA r16"]
    assert all(row["perplexity"] > 1 for row in report["rows"])
    assert report["calibration"]["random"]["sigma"] >= 0 and report["calibration"]["ebss"]["tasks"] == 2
    for method in methods:
        assert f"| {method} |" in printed
    assert (out / "compare.md").read_text().count("| W4 |") == 6
    eora = next(row for row in report["rows"] if row["method"].endswith("EoRA r16"))
    base = next(row for row in report["rows"] if row["method"] == "GPTQ + EBSS + AGQ")
    assert eora["size_mb"] > base["size_mb"]  # the factors are counted
    # Run again: every variant is already there, so nothing is quantized twice.
    assert main(args) == 0
    again = json.loads((out / "compare.json").read_text())
    assert [row["wall_s"] for row in again["rows"]] == [row["wall_s"] for row in report["rows"]]


def test_shared_experts_and_a_pyramid_are_quantized(tmp_path):
    """GPTQ on the always-active shared MLP, with its own input and middle Hessians (calibration
    hooks on shared_mlp.w1 and .w2), packed and loaded like every other linear; and on blocks of
    2 and 4 experts (PR-MoE), each packed with its own E."""
    config = moe.ModelConfig(num_layers=2, num_heads=2, max_seq_len=64, moe=moe.MoEConfig(
        hidden_size=32, ffn_hidden_size=16, num_experts=[2, 4], top_k=2, router="random", num_shared_experts=1))
    torch.manual_seed(0)
    model = moe.MoETransformer(config).eval()
    moe.save_pretrained(model, tmp_path / "fp")
    with ray_session(None, num_cpus=2):
        quantize_model(str(tmp_path / "fp"), str(tmp_path / "q"), small_options(shards=1, bits=8), progress=False)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    for name in ("w1", "w3", "w2"):
        assert f"blocks.1.ffn.shared_mlp.{name}.weight.qweight" in tensors
        assert f"blocks.1.ffn.shared_mlp.{name}.weight" not in tensors
    assert tensors["blocks.0.ffn.experts.w1.qweight"].shape[0] == 2 and tensors["blocks.1.ffn.experts.w1.qweight"].shape[0] == 4
    quantized = moe.load_pretrained(tmp_path / "q", device="cpu")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference, got = model(ids), quantized(ids)
    assert not torch.equal(quantized.blocks[1].ffn.shared_mlp.w1.weight, model.blocks[1].ffn.shared_mlp.w1.weight)
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()  # 8 bits: close to the fp model
