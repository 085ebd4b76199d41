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
    calibration_runs,
    calibration_sigma,
    check_eora_rank,
    check_ks,
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
EORA_BASE = "gptq-ebss-agq"
"""The variant the EoRA rows add their correction to (MoEQuant's full method)."""
DEFAULT_EORA_RANK = 16
"""The EoRA rows' rank when ``--eora`` is not given (lowered to the model's smallest linear)."""
COMPARE_COLUMNS = ("bits", "method", "k", "val_loss", "val_loss_se", "delta_vs_fp", "delta_se", "perplexity",
                   "ppl_vs_fp", "calibration_sigma", "wall_s", "ray_tasks", "size_mb")


def compare(model_path: str, out: str, bits_list: list[int], base: QuantizeOptions, ray_address=None, ray_cpus=None,
            data=None, eval_tokens: Optional[int] = None, eval_batch_size: int = 16, progress: bool = True,
            device: Optional[str] = None, eora_rank: Optional[int] = None) -> dict:
    """Quantize ``model_path`` every way of :data:`VARIANTS` at each of ``bits_list``, plus
    :data:`EORA_BASE` with an EoRA correction of rank ``eora_rank`` (None: :data:`DEFAULT_EORA_RANK`
    or the largest the model allows; 0: no EoRA rows), and evaluate each on the validation split at
    the calibration k (with several ks, ``base.experts`` a list: at each of them, one row per k),
    on the validation windows recorded with the model (:func:`launch.evaluate.evaluate_path`;
    ``eval_tokens`` replaces their token count), each row with its loss's standard error and the
    paired difference with FP at the same k on the same windows (mean and standard error).
    Each calibration set is built once (and saved in ``OUT/calibration``); a variant already
    quantized in OUT is evaluated, not redone. ``out`` must lie apart from ``model_path``; SIGTERM
    or SIGINT raise :class:`Stopped`, what is finished kept in ``out`` for the same call to resume."""
    from launch.export import check_output_apart

    check_output_apart(out, model_path, "--out", "--model")
    with stop_on_signals():
        return _compare(model_path, out, bits_list, base, ray_address, ray_cpus, data, eval_tokens, eval_batch_size,
                        progress, device, eora_rank)


def _eora_rank(model, requested: Optional[int]) -> int:
    """The EoRA rows' rank: ``requested`` (checked against the model's linears), or by default
    :data:`DEFAULT_EORA_RANK` lowered to the smallest ``min(out, in)`` of a corrected linear."""
    from moe.quant.calibrate import all_targets, eora_target, target_weight

    if requested is not None:
        if requested:
            check_eora_rank(model.config, model.state_dict(), requested)
        return requested
    state = model.state_dict()
    limit = min(min(target_weight(state, t).shape) for t in all_targets(model.config) if eora_target(t) and not t.expert)
    return min(DEFAULT_EORA_RANK, limit)


def _compare(model_path: str, out: str, bits_list: list[int], base: QuantizeOptions, ray_address, ray_cpus, data,
             eval_tokens: Optional[int], eval_batch_size: int, progress: bool, device: Optional[str],
             eora_rank: Optional[int] = None) -> dict:
    from launch.evaluate import evaluate_path, paired_difference
    from moe import load_pretrained, set_active_experts
    from moe.quant.storage import size_on_disk

    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    meta = _read_export_meta(model_path)
    model = load_pretrained(model_path, device="cpu")
    if base.experts is not None:
        check_ks(base.experts, max(layer.num_experts for layer in _moe_layers(model)))
        set_active_experts(model, base.ks[0])
    k = [layer.active_experts for layer in _moe_layers(model)]
    runs = calibration_runs(model, base)
    eval_ks = base.ks if base.ks is not None and len(base.ks) > 1 else [k[0] if len(set(k)) == 1 else None]
    rank = _eora_rank(model, eora_rank)
    wants_cpu = device is not None and device == "cpu"
    eval_device = "cuda" if torch.cuda.is_available() and not wants_cpu else "cpu"  # this process evaluates
    eval_args = dict(k=None, data=data, tokens=eval_tokens, batch_size=eval_batch_size, device=eval_device)
    fp = {eval_k: evaluate_path(model_path, **{**eval_args, "k": eval_k}) for eval_k in eval_ks}
    rows = [{"bits": 32, "method": "FP", "k": eval_k, "val_loss": ev["loss"], "val_loss_se": ev["loss_stderr"],
             "delta_vs_fp": None, "delta_se": None, "perplexity": ev["perplexity"], "ppl_vs_fp": 1.0, "calibration_sigma": None, "wall_s": None, "ray_tasks": None,
             "size_mb": size_on_disk(model_path) / 1e6} for eval_k, ev in fp.items()]
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
            sets[calib] = {"input_ids": ids, "sigma": calibration_sigma(model, ids, device, runs), "seconds": seconds,
                           "tasks": tasks, "num_sequences": ids.shape[0], "seq_len": ids.shape[1]}
        variants = [(name, method, calib, agq, 0) for name, method, calib, agq in VARIANTS]
        if rank:
            variants += [(f"{name}-eora{rank}", method, calib, agq, rank)
                         for name, method, calib, agq in VARIANTS if name == EORA_BASE]
        for bits in bits_list:
            for name, method, calib, agq, eora in variants:
                options = QuantizeOptions(**{**asdict(base), "bits": bits, "method": method, "calib": calib, "agq": agq,
                                             "eora": eora})
                target = root / f"w{bits}-{name}"
                existing = _finished_options(target)
                if existing != asdict(options):
                    quantize_model(model_path, str(target), options, data=data, overwrite=True,
                                   calibration=sets[calib]["input_ids"], progress=progress, device=device)
                saved = json.loads((target / "config.json").read_text())["quantization"]
                wall, tasks = saved["wall_s"], saved["ray_tasks"]
                for eval_k in eval_ks:
                    ev = evaluate_path(str(target), **{**eval_args, "k": eval_k})
                    delta, delta_se = paired_difference(ev, fp[eval_k])
                    rows.append({"bits": bits, "method": options.label, "k": eval_k, "val_loss": ev["loss"],
                                 "val_loss_se": ev["loss_stderr"], "delta_vs_fp": delta, "delta_se": delta_se,
                                 "perplexity": ev["perplexity"], "ppl_vs_fp": ev["perplexity"] / fp[eval_k]["perplexity"],
                                 "calibration_sigma": None if method == "rtn" else sets[calib]["sigma"],
                                 "wall_s": wall, "ray_tasks": tasks, "size_mb": size_on_disk(target) / 1e6})
    first = fp[eval_ks[0]]
    report = {
        "model": str(model_path), "k": k, "calibration_ks": base.ks if base.ks is not None and len(base.ks) > 1 else None,
        "eval_ks": eval_ks, "eora_rank": rank or None, "rows": rows, "eval_tokens": first["tokens"],
        "validation": first["validation"],
        "calibration_device": device, "eval_device": first["device"],
        "calibration": {name: {key: value for key, value in s.items() if key != "input_ids"} for name, s in sets.items()},
        "settings": {key: value for key, value in asdict(base).items()
                     if key not in ("bits", "method", "calib", "agq", "eora")},
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
    """The report as a markdown table and notes; a k column when it was evaluated at several ks."""
    several = len(report.get("eval_ks") or [None]) > 1
    k_head, k_rule = ("k | ", "---|") if several else ("", "")
    lines = [f"| bits | method | {k_head}val loss | Δ vs FP (paired) | perplexity | ppl / FP | calib sigma | wall s | "
             "Ray tasks | MB |", f"|---|---|{k_rule}---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        delta = row.get("delta_vs_fp")
        lines.append("| " + " | ".join([
            "FP32" if row["bits"] == 32 else f"W{row['bits']}", row["method"], *([_fmt(row.get("k"))] if several else []),
            _fmt(row["val_loss"]) + (f" ± {row['val_loss_se']:.4f}" if row.get("val_loss_se") is not None else ""),
            "-" if delta is None else f"{delta:+.4f} ± {row['delta_se']:.4f}", _fmt(row["perplexity"], 3), _fmt(row["ppl_vs_fp"], 3), _fmt(row["calibration_sigma"]),
            _fmt(row["wall_s"], 1), _fmt(row["ray_tasks"]), _fmt(row["size_mb"], 2)]) + " |")
    calibration = report["calibration"]
    ks = report.get("calibration_ks")
    at = (f"k={','.join(map(str, ks))} (Hessians summed over the ks; sigma: their mean)" if ks
          else f"k={report['k'][0] if len(set(report['k'])) == 1 else report['k']}")
    notes = [f"Calibration sets at {at}: "
             + "; ".join(f"{name}: {c['num_sequences']} x {c['seq_len']} tokens, expert-balance sigma {c['sigma']:.4f}"
                         + (f", built in {c['seconds']:.1f} s by {c['tasks']} Ray tasks" if c["seconds"] is not None else "")
                         for name, c in calibration.items()),
             f"Validation: {report.get('validation') or str(report['eval_tokens']) + ' tokens'}"
             + (", at each k" if several else "") + "; ± one standard error over the windows. Δ vs FP: the mean "
             "and standard error of the per-window loss difference with the FP model at the same k, on the same windows.",
             f"Devices: calibration passes on {report.get('calibration_device', 'cpu')}, evaluation on "
             f"{report.get('eval_device', 'cpu')}."]
    if report.get("eora_rank"):
        notes.append(f"EoRA r{report['eora_rank']}: {EORA_BASE.upper().replace('-', ' + ')} plus a rank-"
                     f"{report['eora_rank']} correction of each linear but the router (float16 factors, in MB).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_compare(report: dict, root: Path) -> None:
    (root / "compare.json").write_text(json.dumps(report, indent=2))
    with open(root / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS)
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow({key: row[key] for key in COMPARE_COLUMNS})
    (root / "compare.md").write_text(f"# Quantization of {report['model']}\n\n" + compare_table(report))
