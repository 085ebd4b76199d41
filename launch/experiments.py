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
BALANCING_RATES = (1e-4, 1e-3, 1e-2)
BALANCING_MODES = ("sign", "proportional")
BALANCING_STEPS = 3000
"""The balancing experiment's grid: the learned router's bias at each update rule and rate (long
enough for the bias to settle: at 1e-3 a sign update moves an expert's bias by at most 3 in 3000
steps), against the auxiliary loss and the fixed random router's bias."""


def bias_run(mode: str, rate: float) -> str:
    return f"learned_bias_{mode}_{rate:g}"


RUN_SETTINGS = {
    **{bias_run(mode, rate): [f"model.moe.bias_update_mode={mode}", f"model.moe.bias_update_rate={rate}"]
       for mode in BALANCING_MODES for rate in BALANCING_RATES},
    # fast early, quiet late: 1e-2 / (1 + t / 300), 1e-2 at the start, 9e-4 at step 3000
    "learned_bias_sign_decaying": ["model.moe.bias_update_mode=sign", "model.moe.bias_update_rate=0.01",
                                   "model.moe.bias_update_schedule=inverse_time", "model.moe.bias_update_t0=300"],
    # the aux-loss run's softmax scores, so that only the balancing differs from it
    "learned_bias_softmax": ["model.moe.score_function=softmax"],
}
"""``--set`` assignments of the runs that differ from their config file (before the user's)."""

EXPERIMENTS = {
    "slimming": [("smoe_dropout", "configs/tiny.yaml"), ("learned_k2", "configs/learned_aux.yaml")],
    "balancing": [("learned_aux_loss", "configs/learned_aux.yaml")]
                 + [(bias_run(mode, rate), "configs/learned_bias.yaml") for mode in BALANCING_MODES
                    for rate in BALANCING_RATES]
                 + [("learned_bias_sign_decaying", "configs/learned_bias.yaml"),
                    ("learned_bias_softmax", "configs/learned_bias.yaml"),
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
    "train.eval_every=1000", "data.val_tokens=524288", "train.save_every=1000", "data.val_permille=10",
]
"""Overrides that turn every run of an experiment into the GPU-scale version (``--scale gpu``)."""
GPU_SCALE_RUNS = {
    "smoe_dropout": ["model.moe.k_max=16", "model.moe.k_schedule_steps=20000"],
}
"""Per-run additions at GPU scale: the SMoE-Dropout schedule spans the longer run and all 16 experts."""


EXPERIMENT_SETTINGS = {
    "balancing": [f"train.steps={BALANCING_STEPS}", "train.eval_every=500", "train.save_every=500"],
}
"""``--set`` assignments of every run of an experiment (before the scale's and the user's)."""


def run_overrides(label: str, scale: str, overrides: list[str], experiment: str = "") -> list[str]:
    """The ``--set`` assignments of run ``label`` at ``scale``: the experiment's, the run's, the
    scale's, then the user's ``--set``, which come last and win."""
    scaled = GPU_SCALE + GPU_SCALE_RUNS.get(label, []) if scale == "gpu" else []
    return EXPERIMENT_SETTINGS.get(experiment, []) + RUN_SETTINGS.get(label, []) + scaled + list(overrides)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("experiment", help="train, evaluate and tabulate an experiment (slimming, balancing)")
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--out", default=None, help="output folder (default: runs/exp_<name>)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per training run (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of every run's config (e.g. train.steps=100)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="validation tokens per evaluation (default: as recorded with each run, data.val_tokens)")
    parser.add_argument("--runs", default=None, metavar="LABEL,...",
                        help="train and tabulate only these runs of the experiment, in this order (default: all)")
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


def _loss_cells(result: dict, prefix: str = "") -> dict:
    return {f"{prefix}val_loss": result["loss"], f"{prefix}val_loss_se": result["loss_stderr"]}


def slimming_rows(exports: dict[str, Path], tokens) -> list[dict]:
    from launch.evaluate import evaluate_path
    from launch.slim import default_ks
    from moe import load_pretrained

    num_experts = load_pretrained(next(iter(exports.values()))).config.moe.max_experts
    rows = []
    for k in default_ks(num_experts):
        row = {"k": k}
        for label, export in exports.items():
            row.update(_loss_cells(evaluate_path(str(export), k=k, tokens=tokens), f"{label}_"))
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


def designs_rows(exports: dict[str, Path], tokens) -> list[dict]:
    from launch.evaluate import evaluate_path
    from moe import load_pretrained

    rows = []
    for label, export in exports.items():
        model = load_pretrained(export, device="cpu")
        ks = [layer.active_experts for layer in model.modules() if hasattr(layer, "active_experts")]
        result = evaluate_path(str(export), tokens=tokens)  # at the k each run was trained to
        rows.append({"run": label, "experts": str(model.config.moe.num_experts), "k": str(sorted(set(ks))),
                     "shared": model.config.moe.num_shared_experts, **_loss_cells(result),
                     "perplexity": result["perplexity"], "max_vio": result["max_vio"],
                     "parameters": model.num_parameters(),
                     "active_parameters": model.num_parameters(active_k=max(ks))})
    return rows


def _train_max_vio(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, MaxVio of each training log window (mean over layers), mean bias range over layers)
    from a run's ``metrics.jsonl``; the bias range is NaN for runs without a bias."""
    steps, vio, spread = [], [], []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return steps, vio, spread
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") != "train":
            continue
        ranges = [value for key, value in record.items() if key.startswith("bias_range/")]
        steps.append(int(record["step"]))
        vio.append(float(record["train/max_vio"]))
        spread.append(sum(ranges) / len(ranges) if ranges else float("nan"))
    return steps, vio, spread


def balancing_rows(exports: dict[str, Path], tokens) -> list[dict]:
    """At k = 2 on the validation windows: loss ± s.e., its paired difference with the auxiliary
    loss's run, MaxVio over the whole validation set (load summed over it: MaxVio_global), and
    from training: the mean MaxVio of the last tenth of the log windows and the bias's final range."""
    from launch.evaluate import evaluate_path, paired_difference
    from moe import load_pretrained

    results = {label: evaluate_path(str(export), k=2, tokens=tokens) for label, export in exports.items()}
    reference = results.get("learned_aux_loss")
    rows = []
    for label, export in exports.items():
        result = results[label]
        moe_config = load_pretrained(export, device="cpu").config.moe
        steps, vio, spread = _train_max_vio(export.parent)
        tail = vio[len(vio) - max(1, len(vio) // 10):] if vio else [float("nan")]
        row = {"run": label, "router": moe_config.router, "balance": moe_config.balance,
               "update": moe_config.bias_update_mode if moe_config.balance == "bias" else "-",
               "rate": f"{moe_config.bias_update_rate:g}" if moe_config.balance == "bias" else "-",
               "steps": steps[-1] if steps else 0, **_loss_cells(result)}
        if reference is not None:
            row["val_loss_vs_aux"], row["vs_aux_se"] = paired_difference(result, reference)
        row.update({"max_vio_global": result["max_vio"], "max_vio_train_last10pct": sum(tail) / len(tail),
                    "bias_range": spread[-1] if spread else float("nan")})
        rows.append(row)
    return rows


def validation_note(export: Path, tokens) -> str:
    """What the experiment's validation read (the same windows for every run of a corpus)."""
    from launch.evaluate import load_model_for_eval, validation_for

    model, trained_on = load_model_for_eval(str(export), "cpu")
    return validation_for(str(export), model, trained_on, tokens=tokens)[1].describe()


def plot_max_vio(exports: dict[str, Path], path: Path) -> Path:
    """MaxVio over training steps (each log window's load, mean over layers) of every run, and the
    bias range of the bias-balanced runs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (vio_axis, bias_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, export in exports.items():
        steps, vio, spread = _train_max_vio(export.parent)
        if not steps:
            continue
        line, = vio_axis.plot(steps, vio, label=label, linewidth=1)
        if any(value == value for value in spread):
            bias_axis.plot(steps, spread, label=label, linewidth=1, color=line.get_color())
    vio_axis.set(xlabel="step", ylabel="MaxVio (training log window, mean over layers)", yscale="log",
                 title="load imbalance during training")
    bias_axis.set(xlabel="step", ylabel="bias max - min (mean over layers)", title="expert bias range")
    vio_axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1 or (args.tokens is not None and args.tokens < 1):
        raise UserError(f"--nproc and --tokens must be >= 1, got {args.nproc} and {args.tokens}")
    runs = dict(EXPERIMENTS[args.name])
    labels = list(runs)
    if args.runs:
        labels = [label.strip() for label in args.runs.split(",") if label.strip()]
        unknown = [label for label in labels if label not in runs]
        if unknown or not labels:
            raise UserError(f"--runs {args.runs!r}: unknown run(s) {', '.join(unknown) or '(none given)'}; "
                            f"the {args.name} experiment has {', '.join(runs)}")
    out = Path(args.out or f"runs/exp_{args.name}")
    out.mkdir(parents=True, exist_ok=True)
    exports = {}
    for label in labels:
        config = runs[label]
        overrides = run_overrides(label, args.scale, args.overrides, args.name)
        if label == "upcycled":
            exports[label] = _upcycled_run(out, args.nproc, overrides)
        else:
            exports[label] = _train_and_export(label, config, out, args.nproc, overrides)
    rows = {"slimming": slimming_rows, "balancing": balancing_rows, "designs": designs_rows}[args.name](
        exports, args.tokens)
    table = markdown(rows)
    plots = [plot_max_vio(exports, out / "max_vio.png")] if args.name == "balancing" else []
    settings = "; ".join(f"{label} = {runs[label]}" + (f" {' '.join(RUN_SETTINGS[label])}" if label in RUN_SETTINGS else "")
                         for label in labels)
    (out / "results.md").write_text(
        f"# Experiment: {args.name}\n\n{table}\n\n"
        f"Validation: {validation_note(next(iter(exports.values())), args.tokens)}. "
        "val_loss ± val_loss_se: the mean over the validation windows and its standard error (one validation for "
        "every command: launch.data.validation_windows)"
        + ("; val_loss_vs_aux ± vs_aux_se: the paired per-window difference with learned_aux_loss" if args.name == "balancing" else "")
        + f".\n\nRuns: {settings}"
        + (f"; every run: {' '.join(EXPERIMENT_SETTINGS[args.name])}" if args.name in EXPERIMENT_SETTINGS else "")
        + (f"; scale {args.scale}" if args.scale != "cpu" else "")
        + (f"; overrides {args.overrides}" if args.overrides else "") + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"experiment": args.name, "scale": args.scale, "overrides": args.overrides,
                                                  "runs": {label: runs[label] for label in labels}, "rows": rows}, indent=2))
    print(table)
    for suffix in ("md", "csv", "json"):
        print(f"{suffix:<5}{out / f'results.{suffix}'}")
    for plot in plots:
        print(f"png  {plot}")
    return 0
