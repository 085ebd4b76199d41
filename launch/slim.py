"""``moe slim --model PATH [--k 1,2,4,8] [--out DIR]``: the same weights at every k, measured.

For each k: validation loss (± its standard error over the validation windows) and perplexity, prefill and decode throughput (decode one token per
step with the fixed-shape decoder of :mod:`moe.decode`: a static KV cache, a CUDA graph per step
on a GPU), active parameters and forward FLOPs per token. Writes ``slim.csv``,
``slim.md``, ``slim.json`` and ``slim.png`` (quality and speed against k) to DIR (default
``PATH/slim``; never PATH itself) and prints the table and the paths.

Budgets pick the largest measured k that fits: ``--budget-ms-per-token X`` (decode time per
token) or ``--budget-flops X`` (forward FLOPs per token). ``moe generate --experts auto`` applies
the same rule to the sweep saved beside the model.

On a quantized export (``moe quantize``) the FP model it was made from is measured beside it at
every k on the same windows (``--baseline`` names another model; ``--no-baseline`` skips it): one
table with both losses and their paired difference, one plot with both curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Optional

import torch

from launch.evaluate import add_device_argument
from moe.errors import UserError

SWEEP_DIR = "slim"
COLUMNS = ("k", "val_loss", "val_loss_stderr", "perplexity", "prefill_tokens_per_s", "decode_tokens_per_s",
           "decode_ms_per_token", "active_parameters", "flops_per_token")
"""The columns of every sweep; one with a baseline adds ``baseline_val_loss``, its standard error,
``delta_vs_baseline`` and ``delta_stderr`` after ``val_loss_stderr``."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("slim", help="quality, speed and cost of one model at every k")
    parser.add_argument("--model", required=True, help="an exported model folder or a training checkpoint folder")
    parser.add_argument("--k", default=None, help="comma-separated ks (default: 1, 2, 4, ... and E)")
    parser.add_argument("--out", default=None, help="output folder (default: MODEL/slim)")
    parser.add_argument("--data", default=None, help="validation data (default: the model's training corpus)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="validation tokens per k (default: as recorded with the model, data.val_tokens)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--baseline", default=None,
                        help="a model measured beside this one at every k, on the same windows (default: for a "
                             "quantized export, the FP model it was made from, when it still exists)")
    parser.add_argument("--no-baseline", action="store_true", help="measure the model alone")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per timing (default 32)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms-per-token", type=float, default=None, help="pick the largest k within this decode time")
    budget.add_argument("--budget-flops", type=float, default=None, help="pick the largest k within these FLOPs per token")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def default_ks(num_experts: int) -> list[int]:
    ks, k = [], 1
    while k < num_experts:
        ks.append(k)
        k *= 2
    return ks + [num_experts]


def parse_ks(text: Optional[str], num_experts: int) -> list[int]:
    if text is None:
        return default_ks(num_experts)
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--k {text!r} is invalid: expected comma-separated integers, e.g. 1,2,4") from None
    bad = [k for k in ks if not 1 <= k <= num_experts]
    if not ks or bad:
        raise UserError(f"--k {text!r} is invalid: every k must be in 1..{num_experts} (the model's experts)")
    return ks


def pick_k(rows: list[dict], budget_ms_per_token: Optional[float] = None, budget_flops: Optional[float] = None) -> int:
    """The largest k whose measured decode time (or FLOPs) per token is within the budget."""
    if (budget_ms_per_token is None) == (budget_flops is None):
        raise UserError("give exactly one budget: ms per token or FLOPs per token")
    key, limit = ("decode_ms_per_token", budget_ms_per_token) if budget_flops is None else ("flops_per_token", budget_flops)
    fitting = [row["k"] for row in rows if row[key] <= limit]
    if not fitting:
        cheapest = min(rows, key=lambda row: row[key])
        raise UserError(f"no k fits a budget of {limit:g} {key.replace('_', ' ')}: the cheapest, k={cheapest['k']}, "
                         f"needs {cheapest[key]:g}")
    return max(fitting)


@torch.no_grad()
def _speed(model, k: int, batch: int, prompt_len: int, decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode seconds per step) at k, on random prompts, with the fixed-shape
    decoder (:class:`moe.decode.StaticDecoder`: a static KV cache, each step a CUDA graph on a GPU),
    after one warm-up pass (which captures the graph), on the model's device (a GPU's queued work
    is waited for before each clock read)."""
    from moe.decode import StaticDecoder
    from moe.devices import synchronize

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(k)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator).to(device)
    decoder = StaticDecoder(model, batch, prompt_len + decode_tokens)

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    prefill, decode = [], []
    for _ in range(2):
        start = clock()
        logits = decoder.prefill(prompt)
        prefill.append(clock() - start)
        start = clock()
        for _ in range(decode_tokens):
            logits = decoder.step(logits.argmax(-1, keepdim=True))
        decode.append((clock() - start) / decode_tokens)
    return batch * prompt_len / prefill[-1], decode[-1]


def sweep(path: str, ks: Optional[list[int]] = None, data: Optional[str] = None, tokens: Optional[int] = None,
          batch_size: int = 8, decode_tokens: int = 32, loaded=None, device=None,
          baseline: Optional[str] = None) -> tuple[list[dict], dict]:
    """One row per k (see ``COLUMNS``) and facts about the run. ``loaded``: the (model, training
    data) :func:`launch.evaluate.load_model_for_eval` already returned for ``path``; otherwise the
    model is loaded onto ``device`` (None: the GPU when there is one). ``baseline``: another model
    (e.g. the FP model a quantized export was made from) measured at every k on the same windows,
    with the per-window difference's mean and standard error (a paired comparison)."""
    from launch.evaluate import evaluate, load_model_for_eval, paired_difference, validation_for
    from moe import set_active_experts
    from moe.devices import describe_device

    model, trained_on = loaded if loaded is not None else load_model_for_eval(path, device)
    num_experts = model.config.moe.max_experts  # k up to the largest E; smaller layers run all of theirs
    ks = ks or default_ks(num_experts)
    split, windows = validation_for(path, model, trained_on, data, tokens=tokens)
    other = None
    if baseline is not None:
        other, _ = load_model_for_eval(baseline, next(model.parameters()).device)
        if other.config.moe.max_experts != num_experts:
            raise UserError(f"--baseline {baseline!r} has {other.config.moe.max_experts} experts, "
                            f"the model {num_experts}: they cannot be compared k by k")
    seq_len = model.config.max_seq_len
    prompt_len = max(1, min(seq_len - decode_tokens, seq_len // 2))
    rows = []
    for k in ks:
        set_active_experts(model, k)
        result = evaluate(model, split, windows, batch_size)
        prefill, decode_s = _speed(model, k, batch_size, prompt_len, decode_tokens)
        row = {"k": k, "val_loss": result["loss"], "val_loss_stderr": result["loss_stderr"]}
        if other is not None:
            set_active_experts(other, k)
            reference = evaluate(other, split, windows, batch_size)
            delta, delta_se = paired_difference(result, reference)
            row.update(baseline_val_loss=reference["loss"], baseline_val_loss_stderr=reference["loss_stderr"],
                       delta_vs_baseline=delta, delta_stderr=delta_se)
        row.update({
            "perplexity": result["perplexity"],
            "prefill_tokens_per_s": prefill, "decode_tokens_per_s": batch_size / decode_s,
            "decode_ms_per_token": 1e3 * decode_s, "active_parameters": model.num_parameters(active_k=k),
            "flops_per_token": model.flops_per_token(active_k=k, context=seq_len // 2),
        })
        rows.append(row)
    quantization = getattr(model, "quantization", None)
    facts = {"model": str(path), "num_experts": num_experts, "val_tokens": windows.tokens, "seq_len": windows.seq_len,
             "validation": windows.describe(), "baseline": baseline,
             "quantized": quantization.get("label") if isinstance(quantization, dict) else None,
             "batch_size": batch_size, "prompt_len": prompt_len, "decode_tokens": decode_tokens,
             "device": describe_device(next(model.parameters()).device), "torch": torch.__version__}
    return rows, facts


def default_baseline(model_path: str) -> Optional[str]:
    """The FP model a quantized export was made from (recorded with it), when it still exists."""
    from moe.files import read_json
    from moe.pretrained import CONFIG_NAME

    config = Path(model_path) / CONFIG_NAME
    if not config.is_file():
        return None
    source = (read_json(config, what="exported model's config").get("quantization") or {}).get("source")
    return source if source and (Path(source) / CONFIG_NAME).is_file() else None


def markdown_table(rows: list[dict]) -> str:
    from launch.evaluate import format_loss

    paired = "baseline_val_loss" in rows[0]
    header = ["k", "val loss"] + (["baseline val loss", "Δ (paired)"] if paired else []) + [
        "perplexity", "prefill tok/s", "decode tok/s", "decode ms/token", "active params", "FLOPs/token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["k"]), format_loss(r["val_loss"], r["val_loss_stderr"])]
        if paired:
            cells += [format_loss(r["baseline_val_loss"], r["baseline_val_loss_stderr"]),
                      f"{r['delta_vs_baseline']:+.4f} ± {r['delta_stderr']:.4f}"]
        cells += [f"{r['perplexity']:.3f}", f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.0f}",
                  f"{r['decode_ms_per_token']:.2f}", f"{r['active_parameters']:,}", f"{r['flops_per_token']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], facts: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"slim.{name}" for name in ("csv", "md", "json", "png")}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    compared = f" Baseline: {facts['baseline']}, on the same windows; Δ = model - baseline, mean and standard error " \
               f"of the per-window differences." if facts.get("baseline") else ""
    paths["md"].write_text(
        f"# Self-slimming sweep of {facts['model']}\n\n{markdown_table(rows)}\n\n"
        f"Validation: {facts['validation']}; ± one standard error over windows.{compared} Speed: batch "
        f"{facts['batch_size']}, prompt {facts['prompt_len']}, {facts['decode_tokens']} decoded tokens with the KV cache, "
        f"on {facts['device']}, torch {facts['torch']}. FLOPs per token at context {facts['seq_len'] // 2}.\n"
    )
    paths["json"].write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    ks = [r["k"] for r in rows]
    fig, (quality, speed) = plt.subplots(1, 2, figsize=(10, 4))
    label = facts.get("quantized") or "model"
    quality.errorbar(ks, [r["val_loss"] for r in rows], yerr=[r["val_loss_stderr"] for r in rows], marker="o",
                     capsize=3, label=label)
    if "baseline_val_loss" in rows[0]:
        quality.errorbar(ks, [r["baseline_val_loss"] for r in rows], yerr=[r["baseline_val_loss_stderr"] for r in rows],
                         marker="s", capsize=3, label="baseline (FP)" if facts.get("quantized") else "baseline")
        quality.legend()
    quality.set(xlabel="active experts k", ylabel="validation loss", title="quality", xscale="log", xticks=ks)
    quality.set_xticklabels([str(k) for k in ks])
    quality.minorticks_off()
    speed.plot(ks, [r["decode_tokens_per_s"] for r in rows], marker="o", label="decode")
    speed.plot(ks, [r["prefill_tokens_per_s"] for r in rows], marker="s", label="prefill")
    speed.set(xlabel="active experts k", ylabel="tokens/s", title="speed", xscale="log", xticks=ks)
    speed.set_xticklabels([str(k) for k in ks])
    speed.minorticks_off()
    speed.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> int:
    from launch.evaluate import load_model_for_eval
    from launch.export import check_output_apart

    for name in ("batch_size", "decode_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out is not None:  # MODEL/slim, the default, is a folder of its own; MODEL itself would mix files
        check_output_apart(args.out, args.model, "--out", "--model", nested=True)
    loaded = load_model_for_eval(args.model, args.device)  # fails early, with one line, on a bad path
    ks = parse_ks(args.k, loaded[0].config.moe.max_experts)
    baseline = None if args.no_baseline else (args.baseline or default_baseline(args.model))
    rows, facts = sweep(args.model, ks, args.data, args.tokens, args.batch_size, args.decode_tokens, loaded,
                        baseline=baseline)
    out = Path(args.out).expanduser() if args.out else Path(args.model).expanduser() / SWEEP_DIR
    paths = write_outputs(rows, facts, out)
    print(f"moe slim: {facts['model']} on {facts['device']}, torch {facts['torch']}")
    print(markdown_table(rows))
    for name, path in paths.items():
        print(f"{name:<5}{path}")
    if args.budget_ms_per_token is not None or args.budget_flops is not None:
        k = pick_k(rows, args.budget_ms_per_token, args.budget_flops)
        print(f"budget: k={k} is the largest measured k within the budget")
    return 0


def load_sweep(model_path: str) -> list[dict]:
    """The rows ``moe slim`` saved beside a model (for ``moe generate --experts auto``)."""
    path = Path(model_path) / SWEEP_DIR / "slim.json"
    if not path.is_file():
        raise UserError(f"--experts auto needs a sweep: run `moe slim --model {model_path}` first ({path} is missing)")
    return json.loads(path.read_text())["rows"]
