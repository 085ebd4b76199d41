"""``moe quantize --compare``: every method at every bit width, evaluated side by side."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from launch.quantize.cluster import Cluster, calibration_device, ray_session, stop_on_signals
from launch.quantize.job import (
    QuantizeOptions,
    _atomic_save,
    _moe_layers,
    _read_export_meta,
    calibration_sigma,
    make_calibration,
    quantize_model,
)

# ------------------------------------------------------------------------------------------------
# --compare
# ------------------------------------------------------------------------------------------------

VARIANTS = (  # (directory name, method, calibration, agq)
    ("rtn", "rtn", "random", False),
    ("gptq", "gptq", "random", False),
    ("gptq-ebss", "gptq", "ebss", False),
    ("gptq-agq", "gptq", "random", True),
    ("gptq-ebss-agq", "gptq", "ebss", True),
)
COMPARE_COLUMNS = ("bits", "method", "val_loss", "perplexity", "ppl_vs_fp", "calibration_sigma", "wall_s", "ray_tasks",
                   "size_mb")


def compare(model_path: str, out: str, bits_list: list[int], base: QuantizeOptions, ray_address=None, ray_cpus=None,
            data=None, eval_batches: int = 32, eval_batch_size: int = 16, progress: bool = True,
            device: Optional[str] = None) -> dict:
    """Quantize ``model_path`` every way of :data:`VARIANTS` at each of ``bits_list`` and evaluate
    each on the validation split at the calibration k. Each calibration set is built once (and
    saved in ``OUT/calibration``); a variant already quantized in OUT is evaluated, not redone.
    ``out`` must lie apart from ``model_path``; SIGTERM or SIGINT raise :class:`Stopped`, what is
    finished kept in ``out`` for the same call to resume."""
    from launch.export import check_output_apart

    check_output_apart(out, model_path, "--out", "--model")
    with stop_on_signals():
        return _compare(model_path, out, bits_list, base, ray_address, ray_cpus, data, eval_batches, eval_batch_size,
                        progress, device)


def _compare(model_path: str, out: str, bits_list: list[int], base: QuantizeOptions, ray_address, ray_cpus, data,
             eval_batches: int, eval_batch_size: int, progress: bool, device: Optional[str]) -> dict:
    from launch.evaluate import evaluate_path
    from moe import load_pretrained, set_active_experts
    from moe.quant.storage import size_on_disk

    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    meta = _read_export_meta(model_path)
    model = load_pretrained(model_path, device="cpu")
    if base.experts is not None:
        set_active_experts(model, base.experts)
    k = [layer.active_experts for layer in _moe_layers(model)]
    wants_cpu = device is not None and device == "cpu"
    eval_device = "cuda" if torch.cuda.is_available() and not wants_cpu else "cpu"  # this process evaluates
    eval_args = dict(k=None, data=data, batches=eval_batches, batch_size=eval_batch_size, device=eval_device)
    fp = evaluate_path(model_path, **{**eval_args, "k": k[0] if len(set(k)) == 1 else None})
    rows = [{"bits": 32, "method": "FP", "val_loss": fp["loss"], "perplexity": fp["perplexity"], "ppl_vs_fp": 1.0,
             "calibration_sigma": None, "wall_s": None, "ray_tasks": None, "size_mb": size_on_disk(model_path) / 1e6}]
    sets: dict = {}
    with ray_session(ray_address, ray_cpus) as ray:
        device = calibration_device(ray, device)
        for calib in ("random", "ebss"):
            path = root / "calibration" / f"{calib}.safetensors"
            options = QuantizeOptions(**{**asdict(base), "calib": calib, "method": "gptq", "agq": False})
            if path.exists():
                from safetensors.torch import load_file

                ids = load_file(str(path))["input_ids"]
                seconds, tasks = None, 0
            else:
                cluster = Cluster(ray, device)
                start = time.perf_counter()
                ids = make_calibration(model, meta, options, cluster, data, progress)
                seconds, tasks = time.perf_counter() - start, cluster.tasks
                path.parent.mkdir(exist_ok=True)
                _atomic_save({"input_ids": ids.contiguous()}, path)
            sets[calib] = {"input_ids": ids, "sigma": calibration_sigma(model, ids, device), "seconds": seconds, "tasks": tasks,
                           "num_sequences": ids.shape[0], "seq_len": ids.shape[1]}
        for bits in bits_list:
            for name, method, calib, agq in VARIANTS:
                options = QuantizeOptions(**{**asdict(base), "bits": bits, "method": method, "calib": calib, "agq": agq})
                target = root / f"w{bits}-{name}"
                existing = _finished_options(target)
                if existing != asdict(options):
                    quantize_model(model_path, str(target), options, data=data, overwrite=True,
                                   calibration=sets[calib]["input_ids"], progress=progress, device=device)
                saved = json.loads((target / "config.json").read_text())["quantization"]
                wall, tasks = saved["wall_s"], saved["ray_tasks"]
                ev = evaluate_path(str(target), **{**eval_args, "k": k[0] if len(set(k)) == 1 else None})
                rows.append({"bits": bits, "method": options.label, "val_loss": ev["loss"], "perplexity": ev["perplexity"],
                             "ppl_vs_fp": ev["perplexity"] / fp["perplexity"],
                             "calibration_sigma": None if method == "rtn" else sets[calib]["sigma"],
                             "wall_s": wall, "ray_tasks": tasks, "size_mb": size_on_disk(target) / 1e6})
    report = {
        "model": str(model_path), "k": k, "rows": rows, "eval_tokens": fp["tokens"],
        "calibration_device": device, "eval_device": fp["device"],
        "calibration": {name: {key: value for key, value in s.items() if key != "input_ids"} for name, s in sets.items()},
        "settings": {key: value for key, value in asdict(base).items() if key not in ("bits", "method", "calib", "agq")},
    }
    write_compare(report, root)
    return report


def _finished_options(target: Path) -> Optional[dict]:
    try:
        return json.loads((target / "config.json").read_text())["quantization"]["options"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if not math.isinf(value) else "inf"
    return str(value)


def compare_table(report: dict) -> str:
    lines = ["| bits | method | val loss | perplexity | ppl / FP | calib sigma | wall s | Ray tasks | MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append("| " + " | ".join([
            "FP32" if row["bits"] == 32 else f"W{row['bits']}", row["method"], _fmt(row["val_loss"]),
            _fmt(row["perplexity"], 3), _fmt(row["ppl_vs_fp"], 3), _fmt(row["calibration_sigma"]),
            _fmt(row["wall_s"], 1), _fmt(row["ray_tasks"]), _fmt(row["size_mb"], 2)]) + " |")
    calibration = report["calibration"]
    notes = [f"Calibration sets at k={report['k'][0] if len(set(report['k'])) == 1 else report['k']}: "
             + "; ".join(f"{name}: {c['num_sequences']} x {c['seq_len']} tokens, expert-balance sigma {c['sigma']:.4f}"
                         + (f", built in {c['seconds']:.1f} s by {c['tasks']} Ray tasks" if c["seconds"] is not None else "")
                         for name, c in calibration.items()),
             f"Validation: {report['eval_tokens']:,} tokens of the model's validation split.",
             f"Devices: calibration passes on {report.get('calibration_device', 'cpu')}, evaluation on "
             f"{report.get('eval_device', 'cpu')}."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_compare(report: dict, root: Path) -> None:
    (root / "compare.json").write_text(json.dumps(report, indent=2))
    with open(root / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS)
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow({key: row[key] for key in COMPARE_COLUMNS})
    (root / "compare.md").write_text(f"# Quantization of {report['model']}\n\n" + compare_table(report))
