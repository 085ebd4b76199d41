"""``moe experiment {slimming,balancing,designs}``: train the runs an experiment compares, evaluate
them, and write the results table. Every figure in the table is computed by this command.

slimming   SMoE-Dropout (``configs/tiny.yaml``: fixed random router, k growing 2 -> 8) against a
           learned-router SMoE trained at a fixed k = 2 (``configs/learned_aux.yaml``), with the same
           parameters, data and steps; validation loss of both at k = 1, 2, 4, ..., E. The paper's
           claim: SMoE-Dropout improves steadily as k grows, while the learned router saturates or
           degrades past the k it was trained at.
balancing  learned router + auxiliary loss, learned router + bias balancing (DeepSeek), fixed random
           router + bias balancing, all at k = 2: MaxVio over the validation set (load summed over
           all of it) and validation loss. DeepSeek reports MaxVio 0.72 -> 0.04 at equal or better
           perplexity when replacing the auxiliary loss by the bias.

designs    the MoE designs of the papers at equal active parameters per token (about 0.69M of tiny's
           1.9M) and equal training steps: the baseline (learned top-2 router, sigmoid, bias balancing:
           ``configs/learned_bias.yaml``), shared experts (DeepSeekMoE: 16 experts of width 64, k = 3,
           plus one shared), Residual-MoE (one dense MLP + one routed expert), a PR-MoE pyramid (4, 4,
           8, 8 experts) and an upcycled model (``configs/tiny_dense.yaml`` trained for half the steps,
           ``moe upcycle`` into 8 experts of half its FFN width at k = 2, trained the other half with
           ``moe train --init``). Validation loss, perplexity, MaxVio and total/active parameters.

Each run trains under the deepspeed launcher (``--nproc`` ranks) into ``OUT/<run>`` and is exported
to ``OUT/<run>/export``; a run whose export exists is not trained again, so an interrupted
experiment continues where it stopped. Results: ``OUT/results.{md,csv,json}``.

Scales: ``--scale cpu`` (default) runs the configs as they are (about 1.9M parameters, 300 steps:
minutes on 2 CPU cores). ``--scale gpu`` applies :data:`GPU_SCALE` to every run of the experiment
(and :data:`GPU_SCALE_RUNS` to the one it names): a 12-layer, width-768 model with 16 experts of
width 768 (368M parameters, 71M active at k = 2), 1024-token sequences, 20,000 steps in
bf16; SMoE-Dropout's k grows 2 -> 16 over the whole run. For 8 GPUs:
``moe experiment slimming --scale gpu --nproc 8 --set data.path=/data/corpus``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from moe.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "slimming": [("smoe_dropout", "configs/tiny.yaml"), ("learned_k2", "configs/learned_aux.yaml")],
    "balancing": [("learned_aux_loss", "configs/learned_aux.yaml"), ("learned_bias", "configs/learned_bias.yaml"),
                  ("random_bias", "configs/exp_random_bias_k2.yaml")],
    "designs": [("baseline", "configs/learned_bias.yaml"), ("shared_experts", "configs/tiny_shared.yaml"),
                ("residual_moe", "configs/tiny_residual.yaml"), ("pr_moe", "configs/tiny_pyramid.yaml"),
                ("upcycled", "configs/tiny_dense.yaml")],
}
UPCYCLE = {"experts": 8, "granularity": 2, "top_k": 2, "router": "learned", "noise": 0.01,
           "changes": {"balance": "bias", "score_function": "sigmoid"}}
"""How the designs experiment's upcycled run turns its dense half into an MoE: 8 experts, each half
of the dense FFN (so k = 2 keeps the active parameters), the baseline's routing."""

GPU_SCALE = [
    "model.num_layers=12", "model.num_heads=12", "model.max_seq_len=1024", "model.moe.hidden_size=768",
    "model.moe.ffn_hidden_size=768", "model.moe.num_experts=16", "train.steps=20000", "train.micro_batch_size=16",
    "train.seq_len=1024", "train.lr=6.0e-4", "train.warmup_steps=1000", "train.log_every=50",
    "train.eval_every=1000", "train.eval_batches=50", "train.save_every=1000", "data.val_permille=10",
]
"""Overrides that turn every run of an experiment into the GPU-scale version (``--scale gpu``)."""
GPU_SCALE_RUNS = {
    "smoe_dropout": ["model.moe.k_max=16", "model.moe.k_schedule_steps=20000"],
}
"""Per-run additions at GPU scale: the SMoE-Dropout schedule spans the longer run and all 16 experts."""


def run_overrides(label: str, scale: str, overrides: list[str]) -> list[str]:
    """The ``--set`` assignments of run ``label`` at ``scale``; the user's ``--set`` come last and win."""
    scaled = GPU_SCALE + GPU_SCALE_RUNS.get(label, []) if scale == "gpu" else []
    return scaled + list(overrides)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("experiment", help="train, evaluate and tabulate an experiment (slimming, balancing)")
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--out", default=None, help="output folder (default: runs/exp_<name>)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per training run (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of every run's config (e.g. train.steps=100)")
    parser.add_argument("--batches", type=int, default=32, help="validation batches per evaluation (default 32)")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: the configs as they are (default); gpu: the documented GPU-scale version of every run")
    parser.set_defaults(func=run)


def _train_and_export(label: str, config: str, out: Path, nproc: int, overrides: list[str],
                      init: Path | None = None) -> Path:
    run_dir, export = out / label, out / label / "export"
    if (export / "config.json").is_file():
        print(f"== {label}: exported model found in {export}; not training again")
        return export
    print(f"== {label}: training {config} on {nproc} rank(s) -> {run_dir}", flush=True)
    command = [sys.executable, "-m", "launch.cli", "train", "--config", str(REPO / config), "--nproc", str(nproc),
               "--set", f"out_dir={run_dir}"]
    if init is not None:
        command += ["--init", str(init)]
    for assignment in overrides:
        command += ["--set", assignment]
    if (run_dir / "checkpoints" / "latest").is_file():
        command.append("--resume")
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"training {label} ({config}) failed; see the output above")
    from launch.export import export_checkpoint

    export_checkpoint(str(run_dir / "checkpoints"), str(export))
    return export


def slimming_rows(exports: dict[str, Path], batches: int) -> list[dict]:
    from launch.evaluate import evaluate_path
    from launch.slim import default_ks
    from moe import load_pretrained

    num_experts = load_pretrained(next(iter(exports.values()))).config.moe.max_experts
    rows = []
    for k in default_ks(num_experts):
        row = {"k": k}
        for label, export in exports.items():
            row[f"{label}_val_loss"] = evaluate_path(str(export), k=k, batches=batches)["loss"]
        rows.append(row)
    return rows


def _upcycled_run(out: Path, nproc: int, overrides: list[str]) -> Path:
    """The designs experiment's upcycled run: the dense config for half the steps, ``moe upcycle``,
    then the MoE for the other half from it (``moe train --init``)."""
    from launch.config import load_run_config
    from launch.evaluate import load_model_for_eval
    from moe import save_pretrained
    from moe.upcycle import upcycle

    steps = load_run_config(REPO / "configs/tiny_dense.yaml", overrides).train.steps
    half = [*overrides, f"train.steps={max(1, steps // 2)}"]
    dense = _train_and_export("upcycled_dense_half", "configs/tiny_dense.yaml", out, nproc, half)
    start = out / "upcycled_start"
    if not (start / "config.json").is_file():
        model, trained_on = load_model_for_eval(str(dense), "cpu")
        moe_model = upcycle(model, UPCYCLE["experts"], UPCYCLE["granularity"], UPCYCLE["router"], UPCYCLE["top_k"],
                            UPCYCLE["noise"], **UPCYCLE["changes"])
        save_pretrained(moe_model, start, metadata={"data": trained_on, "source": {"upcycled_from": str(dense)}})
    rest = [*overrides, f"train.steps={max(1, steps - steps // 2)}"]
    return _train_and_export("upcycled", "configs/tiny_dense.yaml", out, nproc, rest, init=start)


def designs_rows(exports: dict[str, Path], batches: int) -> list[dict]:
    from launch.evaluate import evaluate_path
    from moe import load_pretrained

    rows = []
    for label, export in exports.items():
        model = load_pretrained(export, device="cpu")
        ks = [layer.active_experts for layer in model.modules() if hasattr(layer, "active_experts")]
        result = evaluate_path(str(export), batches=batches)  # at the k each run was trained to
        rows.append({"run": label, "experts": str(model.config.moe.num_experts), "k": str(sorted(set(ks))),
                     "shared": model.config.moe.num_shared_experts, "val_loss": result["loss"],
                     "perplexity": result["perplexity"], "max_vio": result["max_vio"],
                     "parameters": model.num_parameters(),
                     "active_parameters": model.num_parameters(active_k=max(ks))})
    return rows


def balancing_rows(exports: dict[str, Path], batches: int) -> list[dict]:
    from launch.evaluate import evaluate_path

    rows = []
    for label, export in exports.items():
        result = evaluate_path(str(export), k=2, batches=batches)
        rows.append({"run": label, "k": 2, "val_loss": result["loss"], "perplexity": result["perplexity"],
                     "max_vio_global": result["max_vio"]})
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1 or args.batches < 1:
        raise UserError(f"--nproc and --batches must be >= 1, got {args.nproc} and {args.batches}")
    out = Path(args.out or f"runs/exp_{args.name}")
    out.mkdir(parents=True, exist_ok=True)
    exports = {}
    for label, config in EXPERIMENTS[args.name]:
        overrides = run_overrides(label, args.scale, args.overrides)
        if label == "upcycled":
            exports[label] = _upcycled_run(out, args.nproc, overrides)
        else:
            exports[label] = _train_and_export(label, config, out, args.nproc, overrides)
    rows = {"slimming": slimming_rows, "balancing": balancing_rows, "designs": designs_rows}[args.name](
        exports, args.batches)
    table = markdown(rows)
    (out / "results.md").write_text(f"# Experiment: {args.name}\n\n{table}\n\nRuns: "
                                    + ", ".join(f"{label} = {config}" for label, config in EXPERIMENTS[args.name])
                                    + (f"; scale {args.scale}" if args.scale != "cpu" else "")
                                    + (f"; overrides {args.overrides}" if args.overrides else "") + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"experiment": args.name, "scale": args.scale, "overrides": args.overrides,
                                                  "runs": dict(EXPERIMENTS[args.name]), "rows": rows}, indent=2))
    print(table)
    for suffix in ("md", "csv", "json"):
        print(f"{suffix:<5}{out / f'results.{suffix}'}")
    return 0
