"""``moe bench step``: one training step of the MoE model against its dense equivalent, eager and
compiled, and the trainer's overhead over a plain loop (issue 17's targets, measured in one run).

What runs, on one device (``--device``, default the GPU when there is one):

    MoE        the model of the run config (default ``configs/gpu_example.yaml`` cut to 8 layers,
               1024-token sequences, micro-batch 8, as in issue 17), every MoE layer at one k: the
               k schedule's value at step ``--at-step`` (default 0, where training starts)
    dense      the same model with every MoE FFN replaced by a dense SwiGLU FFN of width k * f
               (the FLOPs of k experts of width f, no router); other dense blocks keep their width
    eager      as built
    compiled   ``moe.compile_blocks``: each transformer block compiled with torch.compile
    graphs     (CUDA only) the same with ``mode="reduce-overhead"``: Inductor replays each compiled
               block's forward and backward as CUDA graphs, so the host launches a graph instead of
               every kernel (``torch.compiler.cudagraph_mark_step_begin()`` starts each step)

One step: forward with the loss, the MoE layers' auxiliary losses added, backward, gradient
clipping at ``train.grad_clip``, torch's AdamW (fused on CUDA, as the trainer's; foreach on CPU)
with the config's lr, betas and weight decay (matrices only), ``zero_grad``, and the expert-bias
update. Precision: ``train.precision`` (auto: bf16 on CUDA, fp32 on CPU) cast onto the parameters
only, as DeepSpeed's bf16 engine does (buffers such as the rotary table and the expert biases stay
fp32). Batches are the trainer's own (``launch.data.BatchSampler`` on the
config's data, seed ``train.seed``), put on the device before the timed loop.

Timing: ``--warmup`` untimed steps (the first compiles a compiled model; its time is printed),
then ``--steps`` steps between two CUDA events (wall clock on CPU) with no synchronisation inside
the loop; ms/step is the loop's time over its steps. Each case starts from the same weights. On
CUDA, host ms/step is the time the Python loop took to issue those steps (until the last call
returned): where it is close to ms/step, the GPU waited for the host (launch-bound), and only
fewer launches (compilation, CUDA graphs, fused kernels) make the step faster; where it is much
smaller, the GPU is the bottleneck. The profile's kernel total over ms/step is the GPU's busy share.
Then torch.profiler records ``--profile-steps`` more steps of each MoE case: the top kernels by
device time (by self CPU time on CPU), each one's share of the total.

Trainer overhead (skipped with ``--skip-train``): the MoE model, same precision and batch, in

    plain loop           the step above with the batch drawn and copied to the device in the loop,
                         no DeepSpeed; in bf16 twice: with bf16 weights and AdamW states, and with
                         fp32 master weights and AdamW states (the numerics of DeepSpeed's bf16)
    moe train            ``python -m launch.cli train --nproc 1`` on a copy of the config (grad_accum
                         1, eval off, one log record per step) for warmup + steps steps; its tokens/s
                         is read from the run's ``metrics.jsonl`` over the steps after the warm-up
                         (``train/tokens_per_s``, step time only: the trainer leaves logging,
                         evaluation and checkpoints out of it). The process is ended once its last
                         step is logged (its final checkpoint is not waited for). It runs in a
                         temporary folder, or with ``--set out_dir=DIR`` in a new ``DIR/moe-train``
                         whose logs are kept

Everything printed is measured in the run that prints it; ratios are quotients of printed times.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from launch.bench.profiling import profile_calls, short_name
from moe.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "gpu_example.yaml"
ISSUE_SHAPE = {"layers": 8, "seq_len": 1024, "micro_batch": 8}
"""Issue 17's cut of the default config; ``--layers``/``--seq-len``/``--micro-batch`` override it."""
DEFAULT_CONFIG_OVERRIDES = ("data.path=null",)
"""The default config's data path is a placeholder: it runs on the built-in corpus."""
CASES = (("MoE", "eager"), ("dense", "eager"), ("MoE", "compiled"), ("dense", "compiled"), ("MoE", "graphs"),
         ("dense", "graphs"))
COMPILE_MODES = {"compiled": None, "graphs": "reduce-overhead"}  # torch.compile's mode per compiled case


def cases_to_run(device_type: str, skip_compile: bool, skip_graphs: bool) -> list[tuple[str, str]]:
    """The (model, mode) cases of one run: CUDA graphs only on CUDA, none compiled with ``--skip-compile``."""
    return [(model, mode) for model, mode in CASES
            if not (mode != "eager" and skip_compile)
            and not (mode == "graphs" and (skip_graphs or device_type != "cuda"))]
METRICS = "metrics.jsonl"  # what the training job writes into its out_dir
TOKENS_PER_S = "train/tokens_per_s"  # its scalar of training tokens/s (all ranks, step time only)


def _progress(message: str) -> None:
    print(f"[moe bench step] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (CPU-testable)


def config_overrides(layers: Optional[int], seq_len: Optional[int], micro_batch: Optional[int],
                     default_config: bool) -> list[str]:
    """``--set`` assignments for the shape flags: each flag given wins; with the default config a flag
    not given takes issue 17's value (8 layers, seq 1024, micro-batch 8); with another config, its own."""
    chosen = {"layers": layers, "seq_len": seq_len, "micro_batch": micro_batch}
    overrides = list(DEFAULT_CONFIG_OVERRIDES) if default_config else []
    keys = {"layers": "model.num_layers", "seq_len": "train.seq_len", "micro_batch": "train.micro_batch_size"}
    for name, key in keys.items():
        value = chosen[name] if chosen[name] is not None else (ISSUE_SHAPE[name] if default_config else None)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
            overrides.append(f"{key}={value}")
    return overrides


def tokens_per_s(tokens_per_step: int, ms_per_step: Optional[float]) -> Optional[float]:
    """Tokens per second of a step of ``tokens_per_step`` tokens taking ``ms_per_step`` ms."""
    if ms_per_step is None or not ms_per_step > 0:
        return None
    return tokens_per_step / (ms_per_step / 1e3)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def dense_equivalent_widths(model_cfg, k: int) -> list[int]:
    """Each block's FFN width in the dense equivalent: k * f where the block is MoE, the block's own
    dense width (``dense_ffn_hidden_size``, default f * top_k) elsewhere."""
    moe = model_cfg.moe
    own = model_cfg.dense_ffn_hidden_size or moe.ffn_hidden_size * moe.top_k
    return [k * moe.ffn_hidden_size if model_cfg.is_moe_layer(i) else own for i in range(model_cfg.num_layers)]


def schedule_note(moe_cfg, at_step: int, k: int) -> str:
    """Where k comes from, in words."""
    if moe_cfg.k_schedule == "constant":
        return f"k = {k} (constant schedule: top_k)"
    return (f"k = {k}: the k schedule's value at step {at_step} ({moe_cfg.k_schedule}, {moe_cfg.k_min} -> "
            f"{moe_cfg.k_max} over {moe_cfg.k_schedule_steps} steps)")


def train_k_overrides(model_cfg, k: int, steps: int) -> list[str]:
    """``--set`` assignments that make ``moe train`` run ``steps`` steps at k: none when its schedule
    already gives k at every one of them; else a constant schedule at k, with the dense blocks' width
    written out so that the model does not change with top_k."""
    from moe.schedules import k_at_step

    if all(k_at_step(model_cfg.moe, step) == k for step in range(steps)):
        return []
    width = model_cfg.dense_ffn_hidden_size or model_cfg.moe.ffn_hidden_size * model_cfg.moe.top_k
    return ["model.moe.k_schedule=constant", f"model.moe.top_k={k}", f"model.moe.k_min={k}", f"model.moe.k_max={k}",
            f"model.dense_ffn_hidden_size={width}"]


def step_rows(ms: dict, tokens_per_step: int, flops_per_token: dict) -> list[dict]:
    """The table's rows from ``ms[(model, mode)]`` (ms per step, None where not measured):
    tokens/s, model TFLOP/s (``flops_per_token[model]`` training FLOPs per token) and, on the MoE
    rows, MoE ms / dense ms of the same mode."""
    rows = []
    for model, mode in CASES:
        if (model, mode) not in ms:
            continue
        value = ms[(model, mode)]
        rate = tokens_per_s(tokens_per_step, value)
        rows.append({
            "model": model, "mode": mode, "ms_per_step": value, "tokens_per_s": rate,
            "tflops": None if rate is None else rate * flops_per_token[model] / 1e12,
            "moe_over_dense": ratio(value, ms.get(("dense", mode))) if model == "MoE" else None,
        })
    return rows


def trainer_tokens_per_s(records: list[dict], after_step: int) -> dict:
    """``moe train``'s tokens/s over the steps after ``after_step``, from its ``metrics.jsonl`` records:
    each train record covers the steps since the previous one at its ``train/tokens_per_s``, so the
    steps' total time is the sum of steps / rate, and tokens/s = steps / that time * (tokens per step,
    which cancels out). Windows that begin before ``after_step`` are left out."""
    train = sorted((r for r in records if r.get("event") == "train" and TOKENS_PER_S in r), key=lambda r: r["step"])
    steps = seconds_per_token = 0.0
    previous = 0
    windows = 0
    for record in train:
        window = record["step"] - previous
        if previous >= after_step and window > 0 and record[TOKENS_PER_S] > 0:
            steps += window
            seconds_per_token += window / record[TOKENS_PER_S]
            windows += 1
        previous = record["step"]
    return {"tokens_per_s": steps / seconds_per_token if seconds_per_token else None, "steps": int(steps),
            "windows": windows}


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_report(report: dict) -> str:
    """The text the command prints: what was measured where, the step table, the top kernels and the
    trainer overhead."""
    m = report["model"]
    lines = [
        "# moe bench step",
        "",
        f"- device: {report['device']}, {report['dtype']}, torch {report['torch']}",
        f"- config: {report['config']} {' '.join('--set ' + o for o in report['overrides'])}".rstrip(),
        f"- model: {m['layers']} layers ({m['moe_layers']} MoE), d={m['d']}, E={m['E']}, f={m['f']}, "
        f"{report['k_note']}; {m['params_moe'] / 1e6:,.1f}M parameters ({m['active_params_moe'] / 1e6:,.1f}M active)",
        f"- dense equivalent: each MoE FFN replaced by a dense SwiGLU of width k*f = {report['k']}*{m['f']} = "
        f"{report['k'] * m['f']}; {m['params_dense'] / 1e6:,.1f}M parameters",
        f"- step: {report['step_note']}; {report['tokens_per_step']:,} tokens per step "
        f"({report['micro_batch']} x {report['seq_len']})",
        f"- timing: {report['timing_note']}",
        "",
        "MoE/dense = MoE ms per step / dense ms per step of the same mode; TFLOP/s = model FLOPs "
        "(3 x forward matmuls at k, attention over the sequence) per second.",
        "",
    ]
    rows = []
    for row in report["rows"]:
        case = report["cases"][f"{row['model']} {row['mode']}"]
        rows.append([row["model"], row["mode"], _fmt(row["ms_per_step"], ".3f", "failed"),
                     _fmt(case.get("host_ms_per_step"), ".3f"),
                     _fmt(row["tokens_per_s"], ",.0f"), _fmt(row["tflops"], ".3g"),
                     _fmt(row["moe_over_dense"], ".3f"), _fmt(case.get("first_step_s"), ".1f"),
                     _fmt(case.get("peak_gib"), ".2f"), case.get("note") or ""])
    lines += _table(["model", "mode", "ms/step", "host ms/step", "tokens/s", "TFLOP/s", "MoE/dense", "1st step s",
                     "peak GiB", "note"], rows)
    for name, case in report["cases"].items():
        if case.get("graph_breaks"):
            lines += ["", f"Graph breaks of the {name} step (count, reason):"]
            ranked = sorted(case["graph_breaks"].items(), key=lambda item: -item[1])
            lines += [f"- {count} x {_short(reason, 160)}" for reason, count in ranked[:5]]
    for name, profile in report.get("profiles", {}).items():
        busy = ratio(profile["total_ms_per_step"], report["cases"].get(name, {}).get("ms_per_step"))
        share = f", {busy:.0%} of the timed ms/step" if busy is not None and profile["what"].startswith("CUDA") else ""
        lines += ["", f"Top kernels of the {name} step ({profile['what']}, {profile['steps']} profiled steps, "
                  f"total {profile['total_ms_per_step']:.3f} ms per step{share}):", ""]
        lines += _table(["#", "kernel", "ms/step", "share", "calls/step"], [
            [str(i + 1), _short(k["name"]), f"{k['ms_per_step']:.3f}", _fmt(k["share"], ".1%"),
             _fmt(k["calls_per_step"], ".4g")] for i, k in enumerate(profile["kernels"])])
    trainer = report.get("trainer")
    if trainer is not None:
        lines += ["", f"Trainer overhead (the MoE model, {report['dtype']}, {report['tokens_per_step']:,} tokens per "
                  "step, batches drawn in the loop):", ""]
        lines += _table(["loop", "tokens/s", "moe train / this"], [
            [loop["name"], _fmt(loop["tokens_per_s"], ",.0f"), _fmt(loop.get("train_over_this"), ".3f")]
            for loop in trainer["loops"]])
        for note in trainer.get("notes", []):
            lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _short(name: str, width: int = 90) -> str:
    """For a Markdown table cell."""
    return short_name(name, width).replace("|", "\\|")


# ----------------------------------------------------------------------------------------------------------------
# Models, steps, timing


def build_dense_equivalent(model_cfg, k: int):
    """The model of ``model_cfg`` with every MoE FFN replaced by a dense SwiGLU FFN of width k * f
    (fresh weights, initialised as the model initialises its dense FFNs). Only block 0 is built as
    an MoE layer and then replaced, so the E experts of the other layers are never allocated."""
    from torch import nn

    from moe import MoETransformer
    from moe.model import DenseFFN

    widths = dense_equivalent_widths(model_cfg, k)
    shell = dataclasses.replace(model_cfg, moe_every=model_cfg.num_layers + 1, dense_ffn_hidden_size=widths[0])
    model = MoETransformer(shell)  # block 0 MoE (the model's rule), every other block dense
    d, std = model_cfg.hidden_size, model_cfg.init_std
    for block, width in zip(model.blocks, widths):
        if isinstance(block.ffn, DenseFFN) and block.ffn.w1.out_features == width:
            continue
        block.ffn = DenseFFN(d, width)
        for linear in (block.ffn.w1, block.ffn.w3):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        nn.init.normal_(block.ffn.w2.weight, mean=0.0, std=std / math.sqrt(2 * model_cfg.num_layers))
    return model


def to_training_precision(model, device: torch.device, dtype: torch.dtype):
    """``model`` on ``device`` with its floating-point parameters in ``dtype`` and its buffers as they
    are (the rotary table, expert biases and a fixed router stay fp32): what DeepSpeed's bf16 engine
    does to the model it trains."""
    model.to(device)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def _optimizer(params_or_groups, train_cfg, device: torch.device):
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params_or_groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             weight_decay=train_cfg.weight_decay, **fused)


def make_step(model, train_cfg, device: torch.device, master_weights: bool = False, graphs: bool = False) -> Callable:
    """``step(inputs, labels)``: one training step of ``model`` (see the module docstring). With
    ``master_weights`` the optimizer holds fp32 copies of the parameters and their AdamW states, as
    DeepSpeed's bf16 mode does: gradients are upcast, clipped and applied there, then copied back.
    With ``graphs`` (blocks compiled with CUDA graphs) each step first tells the graphs a new
    iteration begins, so the last one's outputs may be overwritten."""
    from moe import collect_aux_losses, update_expert_biases
    from parallel.engine import parameter_groups

    groups = parameter_groups(model, train_cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    clip = train_cfg.grad_clip
    if master_weights:
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        by_param = dict(zip(map(id, params), masters))
        optimizer = _optimizer([{**g, "params": [by_param[id(p)] for p in g["params"]]} for g in groups],
                               train_cfg, device)
    else:
        masters = params
        optimizer = _optimizer(groups, train_cfg, device)

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        _, loss = model(inputs, labels=labels)
        aux = collect_aux_losses(model)
        (loss if aux is None else loss + aux).backward()
        if master_weights:
            for param, master in zip(params, masters):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(masters, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master_weights:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
        update_expert_biases(model)
        return loss.detach()

    step.optimizer, step.params = optimizer, params  # what it updates (the masters: optimizer's params)
    return step


def time_steps(step: Callable, batches: list, warmup: int, steps: int, device: torch.device) -> dict:
    """Run ``warmup`` steps (the first timed alone: it includes any compilation), then ``steps`` steps
    between two CUDA events (wall clock on CPU), synchronising only before and after the loop."""
    from moe.devices import synchronize

    synchronize(device)
    first_step_s = None
    for i in range(warmup):
        began = time.perf_counter()
        step(*batches[i % len(batches)])
        if i == 0:
            synchronize(device)
            first_step_s = time.perf_counter() - began
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record()
        for i in range(steps):
            step(*batches[(warmup + i) % len(batches)])
        end.record()
        host_ms = 1e3 * (time.perf_counter() - began)  # the host's time to issue the steps
        end.synchronize()
        elapsed_ms = start.elapsed_time(end)
    else:
        began = time.perf_counter()
        for i in range(steps):
            step(*batches[(warmup + i) % len(batches)])
        elapsed_ms = 1e3 * (time.perf_counter() - began)
        host_ms = None  # the host does the work itself: no separate figure
    return {"ms_per_step": elapsed_ms / steps, "first_step_s": first_step_s,
            "host_ms_per_step": None if host_ms is None else host_ms / steps}


def time_plain_loop(step: Callable, sampler, warmup: int, steps: int, device: torch.device) -> float:
    """ms per step of a plain training loop: each step draws its batch and copies it to the device."""
    from moe.devices import synchronize

    def one() -> None:
        inputs, labels = next(sampler)
        step(inputs.to(device), labels.to(device))

    for _ in range(warmup):
        one()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        one()
    synchronize(device)
    return 1e3 * (time.perf_counter() - began) / steps


def profile_steps(step: Callable, batches: list, steps: int, device: torch.device) -> dict:
    """torch.profiler over ``steps`` steps: the top kernels by device time on CUDA (kernel events
    only), by self CPU time of the ops on CPU (``launch.bench.profiling``)."""
    feed = iter(range(steps))
    return profile_calls(lambda: step(*batches[next(feed) % len(batches)]), steps, device)


def _graph_stats() -> dict:
    """What Dynamo did since its counters were cleared: graphs compiled, graph breaks and their reasons."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    reasons = {}
    for reason, count in counters["graph_break"].items():
        first = " ".join(str(reason).split())[:160]
        reasons[first] = reasons.get(first, 0) + count
    breaks = sum(reasons.values())
    return {"note": f"{graphs} graph(s) compiled, {breaks} graph break(s)", "graph_breaks": reasons}


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def run_case(base, name: str, compiled: bool, batches: list, args, train_cfg, device: torch.device,
             profile: bool, compile_options: dict) -> tuple[dict, Optional[dict]]:
    """``compile_options``: torch.compile's keyword arguments for a compiled case (``mode``)."""
    """Time one case on a copy of ``base`` (same starting weights for every case); the copy, its
    gradients and optimizer states are freed before this returns."""

    cuda = device.type == "cuda"
    held = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def measure() -> tuple[dict, Optional[dict]]:
        from moe import compile_blocks

        model = copy.deepcopy(base)
        if compiled:
            # `import torch._dynamo` here would make `torch` a local name of measure() for its whole body
            import torch._dynamo as dynamo
            from torch._dynamo.utils import counters

            dynamo.reset()
            counters.clear()
            compile_blocks(model, **compile_options)
        graphs = compiled and compile_options.get("mode") in ("reduce-overhead", "max-autotune")
        step = make_step(model, train_cfg, device, graphs=graphs)
        case = time_steps(step, batches, max(args.warmup, 2 if compiled else 1), args.steps, device)
        # the case's own memory: its model copy, gradients, optimizer states and activations
        case["peak_gib"] = (torch.cuda.max_memory_allocated(device) - held) / 2**30 if cuda else None
        case.update(_graph_stats() if compiled else {"note": None})
        profiled = profile_steps(step, batches, args.profile_steps, device) if profile and args.profile_steps else None
        return case, profiled

    try:
        result = measure()
    except Exception as err:  # e.g. out of memory or a compiler failure: a result to report
        result = {"ms_per_step": None, "note": f"failed: {_reason(err)}"}, None
        _progress(f"{name}: {result[0]['note']}")
    _release(device)
    return result


def read_records(text: str) -> list[dict]:
    """The JSON records of a ``metrics.jsonl`` being written: a last line still incomplete is left out."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _wait_for_step(process: subprocess.Popen, metrics: Path, step: int, timeout: float) -> Optional[list[dict]]:
    """The run's records once one of them is the train record of ``step`` (None if the process ended
    without writing it); a RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        ended = process.poll() is not None
        records = read_records(metrics.read_text()) if metrics.exists() else []
        if any(r.get("event") == "train" and r.get("step", 0) >= step for r in records):
            return records
        if ended:
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"moe train did not reach step {step} within {timeout:.0f} s")
        time.sleep(0.25)


def _fresh_folder(parent: Path, name: str) -> Path:
    folder, n = parent / name, 1
    while folder.exists():
        n += 1
        folder = parent / f"{name}-{n}"
    return folder


def run_moe_train(cfg, k: int, precision: str, device: torch.device, warmup: int, steps: int,
                  timeout: float, keep_in: Optional[Path] = None, zero_stage: Optional[int] = None) -> dict:
    """``moe train`` (one rank, no launcher) on a copy of ``cfg`` for warmup + steps steps; its tokens/s
    after the warm-up (:func:`trainer_tokens_per_s`). The process is ended (SIGKILL, it is this
    function's own child) once the last step's record is written: its final checkpoint is not waited
    for. It runs in a temporary folder, or, with ``keep_in``, in a new folder there whose logs are kept
    (the unfinished checkpoint is deleted). ``zero_stage`` replaces the config's ZeRO stage."""
    import shutil

    import yaml

    from launch.config import apply_override

    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="moe-bench-step-") as tmp:
        run_dir = _fresh_folder(keep_in, "moe-train") if keep_in is not None else Path(tmp) / "run"
        values = cfg.to_dict()
        values["out_dir"] = str(run_dir.resolve())
        values["data"]["cache_dir"] = str(Path(values["data"]["cache_dir"]).expanduser().resolve())
        if values["data"]["path"] is not None:
            values["data"]["path"] = str(Path(values["data"]["path"]).expanduser().resolve())
        values["train"].update(steps=total, grad_accum=1, log_every=1, eval_every=0, save_every=total,
                               keep_checkpoints=0, precision=precision, compile=False)
        for assignment in train_k_overrides(cfg.model, k, total):
            apply_override(values, assignment)
        if zero_stage is not None:
            zero = values.setdefault("deepspeed", {}).get("zero_optimization")
            values["deepspeed"]["zero_optimization"] = {**(zero if isinstance(zero, dict) else {}), "stage": zero_stage}
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(values, sort_keys=False))
        env = dict(os.environ)
        if device.type == "cpu":
            env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        elif device.index:  # the same GPU: the trainer's one rank takes the first visible device
            visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if device.index < len(visible) else str(device.index)
        command = [sys.executable, "-m", "launch.cli", "train", "--config", str(config_path), "--nproc", "1"]
        log_path = Path(tmp) / "train.log"
        began = time.perf_counter()
        with log_path.open("w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                records = _wait_for_step(process, run_dir / METRICS, total, timeout)
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()
        wall_s = time.perf_counter() - began
        output = log_path.read_text(errors="replace")
        if keep_in is not None:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            if run_dir.exists():
                (run_dir / "train.log").write_text(output)
        if records is None:
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise RuntimeError(f"moe train exited with status {process.returncode} before step {total}:\n{tail}")
    measured = trainer_tokens_per_s(records, warmup)
    measured.update(wall_s=wall_s, kept=str(run_dir) if keep_in is not None else None)
    return measured


def run_trainer_overhead(base, cfg, k: int, dtype: torch.dtype, device: torch.device, args,
                         keep_in: Optional[Path] = None) -> dict:
    """The plain loop(s) and ``moe train`` on the MoE model; ratios moe train / plain loop."""
    from launch.data import BatchSampler, prepare_corpus

    t = cfg.train
    splits = prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.data.val_permille)
    variants = [("plain loop (bf16 weights and AdamW states)", False),
                ("plain loop (fp32 master weights and AdamW states, as DeepSpeed's bf16)", True)]
    if dtype != torch.bfloat16:
        variants = [(f"plain loop ({str(dtype).replace('torch.', '')})", False)]
    loops, notes = [], []
    for name, master in variants:
        _progress(f"trainer overhead: {name}")
        try:
            sampler = BatchSampler(splits.train, t.seq_len, t.micro_batch_size, 0, 1, t.seed)
            step = make_step(copy.deepcopy(base), t, device, master_weights=master)
            ms = time_plain_loop(step, sampler, args.warmup, args.steps, device)
            loops.append({"name": name, "ms_per_step": ms,
                          "tokens_per_s": tokens_per_s(t.micro_batch_size * t.seq_len, ms)})
        except Exception as err:
            loops.append({"name": name, "ms_per_step": None, "tokens_per_s": None})
            notes.append(f"{name} failed: {_reason(err)}")
        step = None  # the copy, its gradients and optimizer states go with it
        _release(device)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    zero = cfg.deepspeed.get("zero_optimization") or {}
    config_stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    stages = getattr(args, "train_stages", None) or [config_stage]
    train_rows, failed = [], False
    for stage in stages:
        name = f"moe train (DeepSpeed, ZeRO stage {stage})"
        _progress(f"trainer overhead: {name} (a subprocess)")
        row = {"name": name, "tokens_per_s": None, "zero_stage": stage}
        try:
            measured = run_moe_train(cfg, k, precision, device, args.warmup, args.steps, args.train_timeout,
                                     keep_in, zero_stage=None if stage == config_stage else stage)
            row["tokens_per_s"] = measured["tokens_per_s"]
            kept = f"; its logs: {measured['kept']}" if measured["kept"] else ""
            notes.append(f"{name}: {measured['steps']} steps after {args.warmup} warm-up steps, from its "
                         f"{METRICS} ({TOKENS_PER_S}, step time only); it ran {measured['wall_s']:.0f} s until its "
                         f"last step was logged (its final checkpoint was not waited for){kept}")
        except RuntimeError as err:
            failed = True
            notes.append(f"{name} failed: {str(err).strip()}")
        train_rows.append(row)
    for loop in loops:  # against the config's own stage (the first measured)
        loop["train_over_this"] = ratio(train_rows[0]["tokens_per_s"], loop["tokens_per_s"])
    return {"loops": loops + train_rows, "notes": notes, "failed": failed}


# ----------------------------------------------------------------------------------------------------------------
# Command


def add_parser(which: argparse._SubParsersAction) -> None:
    parser = which.add_parser("step", help="one training step: MoE vs its dense equivalent, eager and compiled; "
                                           "moe train vs a plain loop")
    parser.add_argument("--config", default=None, help="run config (default configs/gpu_example.yaml, cut to "
                                                       "issue 17's 8 layers, seq 1024, micro-batch 8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--layers", type=int, default=None, help="model.num_layers (default 8 with the default "
                                                                 "config, else the config's)")
    parser.add_argument("--seq-len", type=int, default=None, help="train.seq_len (default 1024 with the default "
                                                                  "config, else the config's)")
    parser.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch_size (default 8 with the "
                                                                      "default config, else the config's)")
    parser.add_argument("--at-step", type=int, default=0, help="measure at the k the k schedule has at this step "
                                                               "(default 0)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5; at least 2 for "
                                                              "a compiled case)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps recorded by torch.profiler for "
                                                                     "the top kernels (default 3; 0: none)")
    parser.add_argument("--device", default="auto", help="auto (default: the GPU if there is one), cpu, cuda, cuda:N")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled cases (default: "
                                                             "torch's default)")
    parser.add_argument("--skip-compile", action="store_true", help="eager cases only")
    parser.add_argument("--skip-graphs", action="store_true", help="no CUDA-graph cases (they run on CUDA only)")
    parser.add_argument("--skip-train", action="store_true", help="no trainer-overhead part (no moe train run)")
    parser.add_argument("--train-stages", type=_stages, default=None,
                        help="ZeRO stages to run moe train at, e.g. 2,1,0 (default: the config's); the plain "
                             "loops' ratio is against the first")
    parser.add_argument("--train-timeout", type=float, default=900.0, help="seconds moe train may take (default 900)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.set_defaults(func=run)


def _stages(text: str) -> list[int]:
    """``"2,1,0"`` -> [2, 1, 0]: ZeRO stages 0..3, each once."""
    try:
        stages = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ZeRO stages (0-3)") from None
    if not stages or any(stage not in (0, 1, 2, 3) for stage in stages) or len(set(stages)) != len(stages):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct ZeRO stages among 0, 1, 2, 3")
    return stages


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps",):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "profile_steps", "at_step"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> int:
    from launch.config import load_run_config
    from launch.data import BatchSampler, prepare_corpus
    from moe import MoETransformer, set_active_experts
    from moe.devices import describe_device, resolve_device
    from moe.schedules import k_at_step

    _check_args(args)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    overrides = config_overrides(args.layers, args.seq_len, args.micro_batch, args.config is None) + list(args.overrides)
    cfg = load_run_config(config, overrides)
    if device.type == "cpu" and args.config is None:
        _progress("note: the default config is GPU-sized; on CPU, pass a small one (e.g. --config configs/tiny.yaml)")
    t, moe_cfg = cfg.train, cfg.model.moe
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    k = k_at_step(moe_cfg, args.at_step)
    tokens_per_step = t.micro_batch_size * t.seq_len

    _progress(f"building the MoE model and its dense equivalent ({describe_device(device)}, {precision})")
    torch.manual_seed(t.seed)
    moe_model = MoETransformer(cfg.model)
    set_active_experts(moe_model, k)
    torch.manual_seed(t.seed)
    dense_model = build_dense_equivalent(cfg.model, k)
    flops = {"MoE": 3 * moe_model.flops_per_token(context=t.seq_len),
             "dense": 3 * dense_model.flops_per_token(context=t.seq_len)}
    model_info = {
        "layers": cfg.model.num_layers, "moe_layers": sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.num_layers)),
        "d": cfg.model.hidden_size, "E": moe_cfg.num_experts, "f": moe_cfg.ffn_hidden_size,
        "params_moe": moe_model.num_parameters(), "active_params_moe": moe_model.num_parameters(active_k=k),
        "params_dense": dense_model.num_parameters(), "train_flops_per_token": flops,
    }
    to_training_precision(moe_model, device, dtype).train()
    to_training_precision(dense_model, device, dtype).train()

    splits = prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.data.val_permille)
    sampler = BatchSampler(splits.train, t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    count = max(args.warmup, 2) + args.steps
    batches = [tuple(tensor.to(device) for tensor in next(sampler)) for _ in range(count)]

    cases = {}
    profiles = {}
    for model_name, mode in cases_to_run(device.type, args.skip_compile, args.skip_graphs):
        compiled = mode != "eager"
        compile_mode = args.compile_mode if mode == "compiled" else COMPILE_MODES.get(mode)
        compile_options = {"mode": compile_mode} if compile_mode else {}
        name = f"{model_name} {mode}"
        _progress(f"{name}: {max(args.warmup, 2 if compiled else 1)} warm-up + {args.steps} timed steps")
        base = moe_model if model_name == "MoE" else dense_model
        cases[name], profiled = run_case(base, name, compiled, batches, args, t, device,
                                         profile=model_name == "MoE", compile_options=compile_options)
        if profiled is not None:
            profiles[name] = profiled
    del dense_model
    _release(device)

    ms = {tuple(name.split(" ")): case.get("ms_per_step") for name, case in cases.items()}
    clip = f"clip at {t.grad_clip:g}, " if t.grad_clip > 0 else ""
    optimizer = "torch AdamW (fused)" if device.type == "cuda" else "torch AdamW (foreach)"
    sync = "two CUDA events" if device.type == "cuda" else "the wall clock"
    report = {
        "device": describe_device(device), "dtype": precision, "torch": torch.__version__,
        "config": _display_path(config), "overrides": overrides, "k": k, "k_note": schedule_note(moe_cfg, args.at_step, k),
        "at_step": args.at_step, "model": model_info, "tokens_per_step": tokens_per_step,
        "micro_batch": t.micro_batch_size, "seq_len": t.seq_len, "steps": args.steps, "warmup": args.warmup,
        "step_note": f"one micro-batch: forward + aux losses, backward, {clip}{optimizer} (lr {t.lr:g}, weight decay "
                     f"{t.weight_decay:g} on matrices), zero_grad"
                     + (", expert-bias update (as in the trainer, on the device)" if moe_cfg.uses_bias else ""),
        "timing_note": f"{args.steps} steps between {sync} after {args.warmup} warm-up steps (at least 2 when "
                       "compiled: the first compiles); 1st step s = the first warm-up step alone; peak GiB = peak "
                       "CUDA memory of the case above what was allocated before it",
        "cases": cases, "rows": step_rows(ms, tokens_per_step, flops), "profiles": profiles,
    }
    status = 0
    if not args.skip_train:
        # --set out_dir=... keeps moe train's logs in a new folder there; otherwise a temporary folder
        keep_in = Path(cfg.out_dir) if any(o.strip().startswith("out_dir=") for o in args.overrides) else None
        report["trainer"] = run_trainer_overhead(moe_model, cfg, k, dtype, device, args, keep_in)
        status = 1 if report["trainer"]["failed"] else 0
    del moe_model
    _release(device)
    print(format_report(report), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    if any(case.get("ms_per_step") is None for case in cases.values()):
        status = 1
    return status
