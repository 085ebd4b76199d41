"""``moe plan --validate``: the cost model's predictions beside what was measured.

Two sources, each against its own cluster file:

- ``moe bench ep`` on 2 CPU ranks (run here, or a JSON it wrote with ``--json``), against
  ``configs/clusters/cpu2.yaml``: step ms and all-to-all ms of each of its configs at EP=1 and EP=2.
- The H100 figures of the GPU runbook, kept in ``configs/clusters/measurements.yaml`` with the
  runbook's words, against the cluster file it names.

A row PASSes when predicted / measured is within ``TOLERANCE``. A row whose figure was used to set
a cluster knob (``sets`` in the measurements file) is printed as a calibration, not counted as a check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from launch.config import _parse_yaml, load_run_config
from launch.plan.cluster import Cluster, load_cluster
from launch.plan.model import Layout, estimate, model_facts
from moe.errors import UserError

TOLERANCE = 0.25
REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "configs" / "clusters"
METRICS = {
    "tokens_per_s": "tokens/s",
    "matmul_tflops": "TFLOP/s",
    "memory_tbps": "TB/s",
    "wall_s": "s",
}


@dataclasses.dataclass
class Row:
    name: str
    unit: str
    predicted: Optional[float]
    measured: Optional[float]
    role: str = "check"
    """"check" (counted), "calibration" (the figure set a knob) or "info" (not comparable)."""
    note: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.predicted is None or not self.measured:
            return None
        return self.predicted / self.measured

    @property
    def verdict(self) -> str:
        if self.role == "info" or self.ratio is None:
            return "n/a" if self.role == "info" else "-"
        if self.role == "calibration":
            return "(set)"
        return "PASS" if abs(self.ratio - 1) <= TOLERANCE else "FAIL"


def layout_of(run_config, world: int) -> Layout:
    """The layout a run config trains with on ``world`` ranks."""
    zero = run_config.deepspeed.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    t = run_config.train
    return Layout(world, run_config.parallel.expert_parallel_size, int(stage), t.micro_batch_size, t.grad_accum)


def predict_run(config_path, overrides, cluster: Cluster, world: int, steps_for_k: Optional[int] = None):
    """Facts, layout and estimate of training ``config_path`` on ``world`` ranks of ``cluster``."""
    run_config = load_run_config(config_path, overrides)
    facts = model_facts(run_config, step=steps_for_k)
    layout = layout_of(run_config, world)
    zero = run_config.deepspeed.get("zero_optimization", {})
    return facts, layout, estimate(facts, layout, cluster, zero if isinstance(zero, dict) else {})


# ----------------------------------------------------------------------------- moe bench ep


def _bench_has_option(option: str) -> bool:
    import argparse

    from launch.bench import ep

    which = argparse.ArgumentParser().add_subparsers()
    ep.add_parser(which)
    return any(option in action.option_strings for action in which.choices["ep"]._actions)


def run_bench_ep(steps: int = 8) -> dict:
    """Run ``moe bench ep`` (2 CPU ranks, about a minute) and return its JSON report; only its
    serial cases (the cost model does not overlap the exchange with compute)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench_ep.json"
        command = [sys.executable, "-m", "launch.cli", "bench", "ep", "--steps", str(steps), "--json", str(out)]
        if _bench_has_option("--chunks"):
            command += ["--chunks", "none"]
        if _bench_has_option("--line-up"):
            command += ["--line-up"]  # the exchange alone: the model's ranks are balanced
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
            raise RuntimeError(f"moe bench ep failed:\n{tail}")
        return json.loads(out.read_text())


def read_bench_json(path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--bench-json {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--bench-json {str(path)!r} is not JSON ({err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise UserError(f"--bench-json {str(path)!r}: not a report of `moe bench ep --json` (no results list)")
    return report


def bench_rows(report: dict, cluster: Cluster) -> list[Row]:
    """Predicted vs measured step ms and a2a ms for each row of a ``moe bench ep`` report."""
    from launch.bench.ep import CONFIGS

    world = int(report.get("world_size", 2))
    cluster = cluster.resized(nodes=1, gpus_per_node=world)
    rows = []
    for result in report["results"]:
        if result.get("chunks", 1) != 1:
            continue  # an overlapped exchange: not modelled
        name = result["config"]
        if name not in CONFIGS:
            raise UserError(f"bench report: unknown config {name!r}; this version of moe bench ep has {sorted(CONFIGS)}")
        overrides = [*CONFIGS[name], "train.grad_clip=1.0", f"parallel.expert_parallel_size={result['ep']}"]
        _, _, est = predict_run(REPO / "configs" / "tiny.yaml", overrides, cluster, world)
        label = f"bench ep {name} EP={result['ep']}"
        rows.append(Row(f"{label}: step", "ms", 1e3 * est.step_s, result["step_ms"],
                        note=f"compute {1e3 * est.compute_s:.0f} ({est.detail}), a2a {1e3 * est.a2a_s:.0f}, "
                             f"all-reduce {1e3 * est.allreduce_s:.0f}"))
        if result["ep"] > 1:
            if result.get("lined_up"):
                note = (f"measured: the exchanges alone, the ranks lined up by a barrier before each (waiting for "
                        f"the slower rank: {result['wait_ms']:.1f} ms per step, left out); predicted: transfer "
                        "and latency of balanced ranks")
            else:
                note = ("measured: time inside the calls, waiting for the other rank included; "
                        "predicted: transfer and latency of balanced ranks")
            rows.append(Row(f"{label}: all-to-all", "ms", 1e3 * est.a2a_s, result["a2a_ms"], note=note))
    return rows


# ----------------------------------------------------------------------------- the runbook's figures


def load_measurements(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"measurements file {str(path)!r} does not exist")
    try:
        values = _parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict) or not isinstance(values.get("checks"), list) or "cluster" not in values:
        raise UserError(f"{path}: expected a mapping with 'source', 'cluster' and a list 'checks'")
    for i, check in enumerate(values["checks"]):
        if not isinstance(check, dict) or check.get("metric") not in METRICS or "measured" not in check:
            raise UserError(f"{path}: checks[{i}] needs a 'metric' (one of {', '.join(METRICS)}) and 'measured'")
    return values


def runbook_rows(measurements: dict, cluster: Cluster) -> list[Row]:
    """One row per figure of the measurements file."""
    rows = []
    for check in measurements["checks"]:
        metric, measured = check["metric"], float(check["measured"])
        role = "calibration" if check.get("sets") else ("info" if check.get("comparable") is False else "check")
        note = check.get("note", "")
        if check.get("sets"):
            note = f"sets {check['sets']}" + (f"; {note}" if note else "")
        if metric == "matmul_tflops":
            predicted = cluster.peak_flops * cluster.matmul_efficiency / 1e12
        elif metric == "memory_tbps":
            predicted = cluster.memory_gbps / 1e3
        else:
            world = int(check.get("gpus", 1))
            sized = cluster.resized(nodes=1, gpus_per_node=world)
            _, layout, est = predict_run(REPO / check["config"], check.get("set", []), sized, world)
            if metric == "tokens_per_s":
                predicted = est.tokens_per_s
                note = (note + "; " if note else "") + f"{layout.label()}, step {1e3 * est.step_s:.1f} ms ({est.detail})"
            else:  # wall_s: the training steps alone
                run_config = load_run_config(REPO / check["config"], check.get("set", []))
                predicted = run_config.train.steps * est.step_s
        rows.append(Row(check["name"], METRICS[metric], predicted, measured, role, note))
    return rows


# ----------------------------------------------------------------------------- printing


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def print_rows(title: str, rows: list[Row]) -> None:
    print(title)
    width = max(len(r.name) for r in rows) + 2
    print(f"  {'':<{width}}{'predicted':>12}{'measured':>12}{'unit':>10}{'ratio':>8}  verdict")
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        print(f"  {r.name:<{width}}{_fmt(r.predicted):>12}{_fmt(r.measured):>12}{r.unit:>10}{ratio:>8}  {r.verdict}")
        if r.note:
            print(f"  {'':<{width}}  {r.note}")


def print_knobs(label: str, cluster: Cluster) -> None:
    print(f"{label}: {cluster.name}")
    for name in ("peak_flops", "matmul_efficiency", "memory_gbps", "op_overhead_us", "intra_node_gbps",
                 "inter_node_gbps", "collective_latency_us", "memory_reserve_gib"):
        source = cluster.provenance.get(name, "not stated in the file")
        print(f"  {name:<22} {getattr(cluster, name):<12.4g} {source}")


def validate(bench_json: Optional[str] = None, measurements_path=None, cpu_cluster_path=None,
             calibrate: bool = False) -> int:
    """Print both comparisons; returns the number of failed checks. ``calibrate``: measure the CPU
    cluster now (``moe plan --calibrate-cpu``) instead of reading ``cpu2.yaml``, so that it and the
    benchmark see the same load."""
    measurements_path = Path(measurements_path or CLUSTERS / "measurements.yaml")
    if calibrate:
        from launch.plan.calibrate import as_yaml, calibrate_cpu
        from launch.plan.cluster import cluster_from_dict

        cpu = cluster_from_dict(_parse_yaml(as_yaml(calibrate_cpu(2), 2)), where="--calibrate-cpu")
    else:
        cpu = load_cluster(cpu_cluster_path or CLUSTERS / "cpu2.yaml")
    measurements = load_measurements(measurements_path)
    gpu = load_cluster(measurements_path.parent / measurements["cluster"])

    print(f"moe plan --validate: predicted / measured within {TOLERANCE:.0%} passes; '(set)' rows set a knob "
          "(not checks); nothing is fitted per row")
    print()
    if bench_json:
        report, origin = read_bench_json(bench_json), f"read from {bench_json}"
    else:
        before = os.getloadavg()[0]
        report = run_bench_ep()
        origin = (f"run now, serial cases (load average {before:.2f} before, {os.getloadavg()[0]:.2f} after, "
                  f"{os.cpu_count()} cores)")
    print_knobs("(a) CPU cluster", cpu)
    print(f"  moe bench ep: {report.get('world_size')} ranks, {report.get('threads')} thread(s) each, "
          f"{report.get('tokens_per_rank')} tokens per rank per step; {origin}")
    rows_a = bench_rows(report, cpu)
    overlapped = sum(1 for r in report["results"] if r.get("chunks", 1) != 1)
    if overlapped:
        print(f"  ({overlapped} overlapped cases, chunks > 1, left out: the cost model does not overlap)")
    print_rows("", rows_a)
    print()
    print_knobs("(b) GPU cluster", gpu)
    print(f"  measured: {measurements.get('source', measurements_path)}")
    rows_b = runbook_rows(measurements, gpu)
    print_rows("", rows_b)
    checks = [r for r in rows_a + rows_b if r.role == "check" and r.ratio is not None]
    failed = [r for r in checks if r.verdict == "FAIL"]
    print()
    print(f"{len(checks) - len(failed)} of {len(checks)} checks within {TOLERANCE:.0%}"
          + (f"; FAIL: {', '.join(r.name for r in failed)}" if failed else ""))
    return len(failed)
