"""``moe bench kernels``: the SwiGLU expert MLP per backend against dense matmuls of equal FLOPs (CUDA, bf16).

For each shape (d, f, E, k, T) and each routing (uniform, skewed) this times, in bf16 on one CUDA GPU,
``kernels.expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation="swiglu", backend=B)``
for B in auto (the default, what users get: the path ``kernels.expert_mlp.choose_backend`` picks for the
inputs, named in the row's note and below the table), triton, torch (on CUDA: ``F.grouped_mm``), loop
(one matmul per expert):

    fwd        the forward as in training: every input that has a gradient requires one
    fwd+bwd    that forward, then ``out.backward(grad_out)`` (gradients of x, row_weight, w1, w3, w2;
               gradients are cleared, untimed, before each call)

and, once per shape, a dense matmul chain of the same FLOPs, the practical peak of the GPU:
forward ``[T*k, d] x [d, 2f]``, then ``[T*k, f] x [f, d]``; backward the four matmuls that give the
input and weight gradients of both (a fixed random ``[T*k, 2f]`` tensor stands in for the gradient of
the first product). Nothing elementwise.

Routing inputs are built as the MoE layer builds them (``moe.dispatch.sort_by_expert``): top-k expert
indices per token [T, k] -> stable sort of the T*k slots by expert -> ``row_index = slot // k``,
``row_weight`` = the gate weights in that order, ``offsets`` = int32 cumulative per-expert counts.

    uniform    each token draws k distinct experts uniformly at random
    skewed     expert e has popularity (e + 1) ** -1.2 (Zipf, exponent 1.2: expert 0 most popular);
               each token draws k distinct experts without replacement, with probability
               proportional to popularity (``torch.multinomial(..., replacement=False)``)

Gate weights are a softmax over k standard normal draws per token. Both come from a CPU generator
seeded with ``--seed``, so a run is reproducible on one torch version.

Timing: CUDA events around each call; ``--warmup`` untimed calls (they also absorb Triton's autotuning),
then the median of ``--repeats`` timed calls. FLOPs: SwiGLU forward = 2 * T * k * d * 3f (three matmuls
of d x f per routed token), backward twice that, so forward+backward = 3x forward. Everything printed is
measured in the run that prints it.

Issue 17's target 1 is checked on the auto rows (column "target 1"): forward+backward at least 70% of
the dense chain on the two original default shapes (:data:`TARGET_DENSE_SHAPES`), and at least as fast as
the torch backend (``F.grouped_mm``) on every shape. The checks print what was measured; nothing asserts
a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from moe.errors import UserError

# Mixtral-like; DeepSeek-like fine-grained; finer still (issue 17)
DEFAULT_SHAPES = "4096,14336,8,2,16384;2048,1408,64,6,16384;1024,512,128,8,16384"
BACKENDS = ("auto", "triton", "torch", "loop")
AUTO = "auto"
# Issue 17, target 1: forward+backward of the default backend >= this fraction of the dense chain on
# these (d, f, E, k, T), and at least as fast as the torch backend (F.grouped_mm) on every shape.
TARGET_OF_DENSE = 0.70
TARGET_DENSE_SHAPES = ((4096, 14336, 8, 2, 16384), (2048, 1408, 64, 6, 16384))
ROUTINGS = ("uniform", "skewed")
DENSE = "dense"
ZIPF_EXPONENT = 1.2
SKEW_DEFINITION = (f"skewed: expert e has popularity (e+1)^-{ZIPF_EXPONENT} (Zipf, expert 0 most popular); each "
                   "token draws its k experts without replacement with probability proportional to popularity")
UNIFORM_DEFINITION = "uniform: each token draws k distinct experts uniformly at random"
TARGET_1_DEFINITION = (
    f"auto rows only (issue 17): 'dense yes' when fwd+bwd >= {TARGET_OF_DENSE:.0%} of dense (binding on "
    + " and ".join(",".join(map(str, shape)) for shape in TARGET_DENSE_SHAPES)
    + "; 'dense -' on other shapes), 'torch yes' when torch/this fwd+bwd >= 1.00 ('torch same' when auto took the "
      "torch path itself: both rows then time one path)"
)

COLUMNS = (  # (key, header, format, definition)
    ("shape", "d,f,E,k,T", "shape", "hidden size, expert FFN size, experts, active experts per token, tokens"),
    ("routing", "routing", "text", "uniform or skewed (see above); - for the dense chain"),
    ("max_over_mean_load", "max/mean load", "num", "tokens of the busiest expert / (T*k/E)"),
    ("backend", "backend", "text", "expert_mlp backend, or dense: the matmul chain of equal FLOPs"),
    ("fwd_ms", "fwd ms", "ms", "forward, median CUDA-event time"),
    ("fwd_tflops", "fwd TFLOP/s", "tflops", "2*T*k*d*3f / fwd time"),
    ("fwd_bwd_ms", "fwd+bwd ms", "ms", "forward + backward, median CUDA-event time"),
    ("fwd_bwd_tflops", "fwd+bwd TFLOP/s", "tflops", "3 * 2*T*k*d*3f / fwd+bwd time"),
    ("fwd_of_dense", "fwd % of dense", "pct", "dense fwd time / this fwd time: the fraction of the practical peak"),
    ("fwd_bwd_of_dense", "fwd+bwd % of dense", "pct", "the same for forward+backward"),
    ("triton_speedup_fwd", "triton speedup fwd", "x", "this backend's fwd time / triton's (same shape and "
                                                         "routing): > 1 means triton is faster"),
    ("triton_speedup_fwd_bwd", "triton speedup fwd+bwd", "x", "the same for forward+backward"),
    ("torch_over_this_fwd_bwd", "torch/this fwd+bwd", "x", "the torch backend's fwd+bwd time / this backend's "
                                                              "(same shape and routing): >= 1 means at least as fast "
                                                              "as torch (F.grouped_mm on sm90+)"),
    ("target_1", "target 1", "text", TARGET_1_DEFINITION),
    ("skewed_over_uniform_fwd", "skewed/uniform fwd", "x", "this backend's skewed fwd time / its uniform fwd time"),
    ("skewed_over_uniform_fwd_bwd", "skewed/uniform fwd+bwd", "x", "the same for forward+backward"),
    ("fwd_bwd_extra_gib", "fwd+bwd extra GiB", "gib", "peak CUDA memory of one fwd+bwd above what was allocated "
                                                       "before it (activations and weight gradients)"),
    ("rel_err_vs_loop", "rel err vs loop", "err", "||out - out_loop|| / ||out_loop|| of the forward output (bf16)"),
    ("note", "note", "text", "why a figure is missing, or which path the torch and auto backends took"),
)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (CPU-testable)


def swiglu_forward_flops(d: int, f: int, k: int, tokens: int) -> int:
    """FLOPs of the SwiGLU expert MLP forward: each of the T*k routed rows does three d x f matmuls
    (x @ w1, x @ w3, act @ w2), 2*d*f FLOPs each. Elementwise work is not counted."""
    return 2 * tokens * k * d * 3 * f


def swiglu_forward_backward_flops(d: int, f: int, k: int, tokens: int) -> int:
    """Forward + backward: the backward does two matmuls (input and weight gradient) per forward matmul."""
    return 3 * swiglu_forward_flops(d, f, k, tokens)


def dense_chain_forward_flops(d: int, f: int, rows: int) -> int:
    """FLOPs of the dense chain's forward: [rows, d] x [d, 2f], then [rows, f] x [f, d]."""
    return 2 * rows * d * 2 * f + 2 * rows * f * d


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def parse_shapes(text: str) -> list[tuple[int, int, int, int, int]]:
    """``"d,f,E,k,T;..."`` -> [(d, f, E, k, T), ...]; a ValueError names the bad item."""
    from launch.bench.shapes import parse_shapes as parse

    return parse(text, "d,f,E,k,T")


def parse_choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(chosen))


def expert_popularity(num_experts: int, routing: str, exponent: float = ZIPF_EXPONENT) -> torch.Tensor:
    """[E] fp64 probabilities of each expert for one draw: flat, or Zipf (expert 0 most popular)."""
    if routing == "uniform":
        weights = torch.ones(num_experts, dtype=torch.float64)
    elif routing == "skewed":
        weights = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-exponent)
    else:
        raise UserError(f"routing {routing!r} is not one of {ROUTINGS}")
    return weights / weights.sum()


def make_routing(tokens: int, num_experts: int, top_k: int, routing: str, seed: int,
                 exponent: float = ZIPF_EXPONENT) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic top-k routing on CPU: (indices [T, k] int64, distinct per token; weights [T, k] fp32,
    a softmax over k standard normals per token). Seeded; see the module docstring for the two laws."""
    if top_k > num_experts:
        raise UserError(f"top_k={top_k} > num_experts={num_experts}")
    generator = torch.Generator().manual_seed(seed)
    popularity = expert_popularity(num_experts, routing, exponent).float()
    indices = torch.multinomial(popularity.expand(tokens, -1).contiguous(), top_k, replacement=False,
                                generator=generator)  # [T, k]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=1)  # [T, k]
    return indices, weights


def load_imbalance(indices: torch.Tensor, num_experts: int) -> float:
    """Assignments of the busiest expert over the mean per expert (1.0 = perfectly balanced)."""
    counts = torch.bincount(indices.flatten(), minlength=num_experts)
    return float(counts.max()) / (indices.numel() / num_experts)


def group_by_expert(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """(row_index [N] int64, row_weight [N], offsets [E] int32, tokens_per_expert [E] int64,
    source_order [N] int64): the expert_mlp inputs, grouped by the layer's own dispatcher
    (``moe.dispatch.sort_by_expert``, dropless)."""
    from kernels import offsets_from_counts
    from moe.dispatch import sort_by_expert
    from moe.routers import Routing

    tokens_per_expert = torch.bincount(indices.flatten(), minlength=num_experts)
    rows = sort_by_expert(indices.new_empty(indices.shape[0], 0), Routing(indices, weights, tokens_per_expert,
                                                                          tokens_per_expert), num_experts)
    return (rows.row_index, rows.row_weight, offsets_from_counts(tokens_per_expert), tokens_per_expert,
            rows.source_order)


def torch_backend_path(d: int, f: int, capability: tuple[int, int]) -> str:
    """Which path ``backend="torch"`` takes on CUDA in bf16 (kernels.grouped_mm's rule)."""
    if capability[0] >= 9 and d % 8 == 0 and f % 8 == 0:
        return "F.grouped_mm"
    return "per-expert loop (F.grouped_mm needs sm90+ and d, f multiples of 8)"


def auto_backend_choice(x: torch.Tensor, num_rows: int, w1: torch.Tensor, w3: Optional[torch.Tensor]) -> str:
    """The backend ``expert_mlp(..., backend="auto")`` takes for these inputs (``num_rows`` grouped rows
    reading ``x``, experts ``w1 [E, d, f]``), by :func:`kernels.expert_mlp.choose_backend`, outside
    ``torch.compile``."""
    from kernels.expert_mlp import choose_backend
    from kernels.grouped_mm import _torch_grouped_mm_supported

    num_experts, hidden, ffn = w1.shape
    return choose_backend(x.device.type, num_rows, num_experts, hidden, ffn, x.element_size(), w3 is not None,
                          _torch_grouped_mm_supported(x, w1) if x.is_cuda else False, compiling=False)


def describe_backend(backend: str, device_type: str, d: int, f: int,
                     capability: Optional[tuple[int, int]] = None) -> str:
    """What an expert_mlp backend runs on this device, in a few words (e.g. ``torch (F.grouped_mm)``)."""
    if device_type == "cuda":
        what = {"triton": "the Triton kernels",
                "torch": torch_backend_path(d, f, capability) if capability is not None else "F.grouped_mm",
                "loop": "per-expert loop", "gather": "gathered weights, batched mat-vec"}
    else:
        what = {"triton": "no Triton off CUDA: the torch path", "torch": "the CPU expert kernel",
                "loop": "per-expert loop", "gather": "gathered weights, batched mat-vec"}
    return f"{backend} ({what[backend]})" if backend in what else backend


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or denominator is None or denominator == 0 else numerator / denominator


def add_derived(rows: list[dict]) -> list[dict]:
    """Fill in TFLOP/s and every ratio from the measured times (in place; also returned).

    Rows carry ``shape`` {d, f, E, k, T}, ``routing`` (None for the dense chain), ``backend`` and
    ``fwd_ms`` / ``fwd_bwd_ms`` (None where not measured)."""

    def key(row: dict) -> tuple:
        s = row["shape"]
        return s["d"], s["f"], s["E"], s["k"], s["T"]

    by = {(key(r), r["routing"], r["backend"]): r for r in rows}
    for row in rows:
        s = row["shape"]
        flops = swiglu_forward_flops(s["d"], s["f"], s["k"], s["T"])
        row["fwd_tflops"] = tflops(flops, row.get("fwd_ms"))
        row["fwd_bwd_tflops"] = tflops(3 * flops, row.get("fwd_bwd_ms"))
        for name in ("fwd_of_dense", "fwd_bwd_of_dense", "triton_speedup_fwd", "triton_speedup_fwd_bwd",
                     "torch_over_this_fwd_bwd", "target_1", "skewed_over_uniform_fwd", "skewed_over_uniform_fwd_bwd"):
            row[name] = None
        if row["backend"] == DENSE:
            continue
        dense = by.get((key(row), None, DENSE), {})
        triton = by.get((key(row), row["routing"], "triton"), {})
        torch_row = by.get((key(row), row["routing"], "torch"), {})
        uniform = by.get((key(row), "uniform", row["backend"]), {})
        for phase in ("fwd", "fwd_bwd"):
            ms = row.get(f"{phase}_ms")
            row[f"{phase}_of_dense"] = _ratio(dense.get(f"{phase}_ms"), ms)
            if row["backend"] != "triton":
                row[f"triton_speedup_{phase}"] = _ratio(ms, triton.get(f"{phase}_ms"))
            if row["routing"] == "skewed":
                row[f"skewed_over_uniform_{phase}"] = _ratio(ms, uniform.get(f"{phase}_ms"))
        if row["backend"] != "torch":
            row["torch_over_this_fwd_bwd"] = _ratio(torch_row.get("fwd_bwd_ms"), row.get("fwd_bwd_ms"))
        if row["backend"] == AUTO:
            row["target_1"] = target_1_check(key(row), row["fwd_bwd_of_dense"], row["torch_over_this_fwd_bwd"],
                                             row.get("auto_path"))
    return rows


def target_1_check(shape: tuple, of_dense: Optional[float], torch_over_auto: Optional[float],
                   auto_path: Optional[str]) -> Optional[str]:
    """Issue 17's target 1 for one auto row: "dense yes|NO|-, torch yes|NO|same|-" (see COLUMNS)."""
    if of_dense is None and torch_over_auto is None:
        return None
    if tuple(shape) not in TARGET_DENSE_SHAPES or of_dense is None:
        dense = "-"
    else:
        dense = "yes" if of_dense >= TARGET_OF_DENSE else "NO"
    if auto_path == "torch":
        versus = "same"
    elif torch_over_auto is None:
        versus = "-"
    else:
        versus = "yes" if torch_over_auto >= 1.0 else "NO"
    return f"dense {dense}, torch {versus}"


def _cell(value, kind: str) -> str:
    if kind == "shape":
        return "{d},{f},{E},{k},{T}".format(**value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if kind in ("text", "pct", "x", "num") else "n/a"
    if kind == "text":
        return str(value).replace("|", "\\|").replace("\n", " ")
    if kind == "tflops" and value < 100:
        return f"{value:.3g}"
    return {"ms": "{:.3f}", "tflops": "{:.0f}", "pct": "{:.0%}", "x": "{:.2f}x", "num": "{:.2f}", "gib": "{:.2f}",
            "err": "{:.1e}"}[kind].format(value)


def format_report(report: dict) -> str:
    """The Markdown the command prints and writes: a header of what was measured where, the column
    definitions, one table, and the notes on rows that could not be measured."""
    lines = [
        "# moe bench kernels",
        "",
        f"- GPU: {report['gpu']} (compute capability {report['capability']}, {report['sms']} SMs)",
        f"- torch {report['torch']} (CUDA {report['cuda']}), triton {report['triton']}, {report['date']}",
        f"- bf16; CUDA-event median of {report['repeats']} calls after {report['warmup']} warm-up calls; "
        f"seed {report['seed']}",
        f"- routing: {UNIFORM_DEFINITION}; {report.get('skew', SKEW_DEFINITION)}",
        "- FLOPs: SwiGLU forward 2*T*k*d*3f, backward twice that; dense = [T*k, d] x [d, 2f] then [T*k, f] x [f, d] "
        "(and the four matmuls of their backward): the same FLOPs, the practical peak",
        "- every figure below was measured in this run",
        "",
        "Columns:",
        "",
    ]
    lines += [f"- **{header}**: {definition}" for _, header, _, definition in COLUMNS]
    lines += ["", "| " + " | ".join(header for _, header, _, _ in COLUMNS) + " |",
              "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in report["results"]:
        cells = [_cell(row.get(key), kind) for key, _, kind, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    auto_paths: dict[str, tuple[str, list[str]]] = {}  # shape -> (path, target-1 checks per routing)
    for row in report["results"]:
        if row["backend"] == AUTO and row.get("auto_path_text"):
            _, checks = auto_paths.setdefault(_cell(row["shape"], "shape"), (row["auto_path_text"], []))
            if row.get("target_1"):
                checks.append(f"{row['routing']} {row['target_1']}")
    if auto_paths:
        lines += ["", "The path backend=\"auto\" took (kernels.expert_mlp.choose_backend on these inputs), and "
                  "target 1 per routing:", ""]
        lines += [f"- {shape}: {path}" + (f"; target 1: {'; '.join(checks)}" if checks else "")
                  for shape, (path, checks) in auto_paths.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Measurement (CUDA)


def add_parser(which: argparse._SubParsersAction) -> None:
    parser = which.add_parser("kernels", help="expert MLP backends (auto, triton, torch, loop) vs dense matmuls "
                                              "of equal FLOPs (CUDA, bf16)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f'"d,f,E,k,T;..." (default "{DEFAULT_SHAPES}")')
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    parser.add_argument("--routings", default=",".join(ROUTINGS), help=f"comma-separated subset of {ROUTINGS}")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls; the median is reported (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the routing and the data (default 0)")
    parser.add_argument("--out", metavar="FILE", help="Markdown output (default benchmarks/kernels-<gpu-name>.md)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.set_defaults(func=run)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(f"moe bench kernels needs a CUDA GPU; torch.cuda.is_available() is False here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})")


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device,
              before: Optional[Callable[[], None]] = None) -> float:
    """Median over ``repeats`` calls of the time of ``fn()`` after ``warmup`` untimed calls; on CUDA
    the GPU time between events recorded around each call. ``before()`` runs untimed before every call.
    (Off CUDA, wall time: only the CPU smoke test of this module's code path uses that.)"""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times, pairs = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    if cuda:
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in pairs]
    return statistics.median(times)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _progress(message: str) -> None:
    print(f"[moe bench kernels] {message}", file=sys.stderr, flush=True)


def _measure_dense(d: int, f: int, rows: int, warmup: int, repeats: int, device: torch.device,
                   dtype: torch.dtype) -> dict:
    """The dense chain of equal FLOPs: forward and forward+backward, plain matmuls under no_grad."""
    opts = {"device": device, "dtype": dtype}
    x = torch.randn(rows, d, **opts)
    w13 = torch.randn(d, 2 * f, **opts) / math.sqrt(d)
    w2 = torch.randn(f, d, **opts) / math.sqrt(f)
    grad_y = torch.randn(rows, d, **opts)
    grad_h = torch.randn(rows, 2 * f, **opts)  # stands in for the gradient of x @ w13

    @torch.no_grad()
    def forward():
        h = x @ w13  # [rows, 2f]
        return h, h[:, :f] @ w2  # [rows, d]

    @torch.no_grad()
    def forward_backward():
        h, _ = forward()
        grad_act = grad_y @ w2.t()  # [rows, f]
        grad_w2 = h[:, :f].t() @ grad_y  # [f, d]
        grad_x = grad_h @ w13.t()  # [rows, d]
        grad_w13 = x.t() @ grad_h  # [d, 2f]
        return grad_act, grad_w2, grad_x, grad_w13

    row = {"fwd_ms": None, "fwd_bwd_ms": None, "note": None}
    try:
        row["fwd_ms"] = median_ms(forward, warmup, repeats, device)
        row["fwd_bwd_ms"] = median_ms(forward_backward, warmup, repeats, device)
    except Exception as err:  # e.g. out of memory: a result to report, not a crash
        row["note"] = f"failed: {_reason(err)}"
    return row


def _measure_backend(backend: str, inputs: dict, reference: Optional[torch.Tensor], warmup: int,
                     repeats: int, device: torch.device) -> dict:
    """Forward and forward+backward of ``expert_mlp`` with one backend; a backend that raises gives a
    row with the reason instead of times."""
    from kernels import expert_mlp

    x, row_weight, w1, w3, w2 = (inputs[name] for name in ("x", "row_weight", "w1", "w3", "w2"))
    row_index, offsets, grad_out = inputs["row_index"], inputs["offsets"], inputs["grad_out"]
    leaves = (x, row_weight, w1, w3, w2)

    def forward() -> torch.Tensor:
        return expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation="swiglu", backend=backend,
                          source_order=inputs["source_order"])

    def forward_backward() -> None:
        forward().backward(grad_out)

    def clear_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    row = {"fwd_ms": None, "fwd_bwd_ms": None, "fwd_bwd_extra_gib": None, "rel_err_vs_loop": None, "note": None}
    try:
        with torch.no_grad():
            out = forward()
        if reference is not None:
            row["rel_err_vs_loop"] = float((out.float() - reference).norm() / reference.norm())
        del out
    except Exception as err:
        row["note"] = f"unavailable: {_reason(err)}"
    if row["note"] is None:
        try:
            row["fwd_ms"] = median_ms(forward, warmup, repeats, device)
            row["fwd_bwd_ms"] = median_ms(forward_backward, warmup, repeats, device, before=clear_grads)
            if device.type == "cuda":
                clear_grads()
                torch.cuda.synchronize(device)
                allocated = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                forward_backward()
                torch.cuda.synchronize(device)
                row["fwd_bwd_extra_gib"] = (torch.cuda.max_memory_allocated(device) - allocated) / 2**30
        except Exception as err:
            row["note"] = f"failed: {_reason(err)}"
    clear_grads()
    _release(device)
    return row


def _moe_inputs(d: int, f: int, experts: int, k: int, tokens: int, routing: str, seed: int, device: torch.device,
                dtype: torch.dtype) -> tuple[dict, float]:
    indices, weights = make_routing(tokens, experts, k, routing, seed)
    row_index, row_weight, offsets, _, source_order = group_by_expert(indices, weights, experts)
    opts = {"device": device, "dtype": dtype}
    inputs = {
        "x": torch.randn(tokens, d, **opts).requires_grad_(),
        "row_index": row_index.to(device),
        "row_weight": row_weight.to(device).requires_grad_(),  # fp32, as the router's gate weights
        "offsets": offsets.to(device),
        "source_order": source_order.to(device),
        "w1": (torch.randn(experts, d, f, **opts) / math.sqrt(d)).requires_grad_(),
        "w3": (torch.randn(experts, d, f, **opts) / math.sqrt(d)).requires_grad_(),
        "w2": (torch.randn(experts, f, d, **opts) / math.sqrt(f)).requires_grad_(),
        "grad_out": torch.randn(tokens, d, **opts),
    }
    return inputs, load_imbalance(indices, experts)


def _loop_reference(inputs: dict) -> Optional[torch.Tensor]:
    from kernels import expert_mlp

    names = ("x", "row_index", "row_weight", "offsets", "w1", "w3", "w2")
    try:
        with torch.no_grad():
            return expert_mlp(*(inputs[n] for n in names), activation="swiglu", backend="loop").float()
    except Exception as err:
        _progress(f"no loop reference output ({_reason(err)})")
        return None


def measure(shapes, backends, routings, warmup: int, repeats: int, seed: int, device="cuda",
            dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Every row of the table (times, then :func:`add_derived`). The command runs it on CUDA in bf16."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    rows = []
    for d, f, experts, k, tokens in shapes:
        shape = {"d": d, "f": f, "E": experts, "k": k, "T": tokens}
        name = f"d,f,E,k,T={d},{f},{experts},{k},{tokens}"
        _progress(f"{name}: dense chain")
        torch.manual_seed(seed)
        rows.append({"shape": shape, "routing": None, "max_over_mean_load": None, "backend": DENSE,
                     **_measure_dense(d, f, tokens * k, warmup, repeats, device, dtype)})
        _release(device)
        for routing in routings:
            torch.manual_seed(seed)
            inputs, imbalance = _moe_inputs(d, f, experts, k, tokens, routing, seed, device, dtype)
            reference = _loop_reference(inputs)
            auto_path = auto_backend_choice(inputs["x"], inputs["row_index"].shape[0], inputs["w1"], inputs["w3"])
            auto_text = describe_backend(auto_path, device.type, d, f, capability)
            for backend in backends:
                _progress(f"{name}: {routing} routing, {backend}")
                row = {"shape": shape, "routing": routing, "max_over_mean_load": imbalance, "backend": backend,
                       **_measure_backend(backend, inputs, reference, warmup, repeats, device)}
                if backend == "torch" and row["note"] is None and capability is not None:
                    row["note"] = torch_backend_path(d, f, capability)
                if backend == AUTO:
                    row.update(auto_path=auto_path, auto_path_text=auto_text)
                    row["note"] = f"took {auto_text}" + (f"; {row['note']}" if row["note"] else "")
                rows.append(row)
            del inputs, reference
            _release(device)
    return add_derived(rows)


def default_out_path(gpu_name: str) -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / f"kernels-{gpu_slug(gpu_name)}.md"


def run(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.shapes)
    backends = parse_choices(args.backends, BACKENDS, "--backends")
    routings = parse_choices(args.routings, ROUTINGS, "--routings")
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    require_cuda()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:
        triton_version = f"not importable ({_reason(err)})"
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    report = {
        "gpu": properties.name, "capability": f"{major}.{minor}", "sms": properties.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dtype": "bfloat16",
        "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "skew": SKEW_DEFINITION,
        "results": measure(shapes, backends, routings, args.warmup, args.repeats, args.seed),
    }
    text = format_report(report)
    print(text)
    out = Path(args.out) if args.out else default_out_path(properties.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0
