"""``moe bench layer`` times forward + backward of one SwiGLU MoE layer (fp32, CPU, T tokens) for a
few shapes (d, f, E, k), against the dropless MoE of DeepSpeed and against dense matmuls of the
same FLOPs:

    ours        ``moe.MoELayer`` (learned router, dropless) in train mode: ``layer(x).backward(g)``
    deepspeed   ``deepspeed.moe.layer.MoE``, dropless (drop_tokens=False, use_rts=False, no 2nd-expert
                sampling, ep_size=1), each expert the same bias-free SwiGLU MLP, with our router
                and expert weights copied in so both layers route every token identically
    dense MLP   that SwiGLU MLP applied to T*k rows: the experts' FLOPs with no routing or dispatch
    dense GEMM  only its three matmuls and their backward matmuls: the same FLOPs, nothing elementwise

The two dense columns are the practical limits. Every backward takes a fixed random gradient, and
gradients are cleared (untimed) before each call. After 2 warm-up rounds the candidates run
round-robin, ``--repeats`` rounds, so drift hits all of them alike. Each time is the median over
the rounds; each ratio is the median of that round's ratios (the two times in a ratio were taken
seconds apart, so a noisy neighbour slows both), printed with the interquartile range of the
ours/MLP ratio to show how much the machine moved.

Below the table, the minor page faults of each column per step (median over the rounds): every
one is a 4 KiB page the kernel maps and zero-fills on first touch. glibc serves allocations of
32 MiB or more with a fresh ``mmap`` each time (and smaller ones whenever it has handed freed
heap memory back to the system), so a step that allocates such a buffer (the weight gradient of
E experts, T*k rows of activations) pays for zeroing it on every call: allocator cost, not
compute, and this table shows which columns carry it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from launch.bench.shapes import parse_shapes
from moe.errors import UserError

DEFAULT_SHAPES = "256,512,8,2;256,128,64,6;512,1024,16,1"
WARMUP = 2
COLUMNS = (  # (key, header, definition)
    ("ours_ms", "ours ms", "moe.MoELayer forward+backward, median wall time"),
    ("deepspeed_ms", "deepspeed ms", "deepspeed.moe.layer.MoE (dropless, same SwiGLU experts) forward+backward"),
    ("dense_mlp_ms", "dense MLP ms", "dense SwiGLU MLP on T*k rows forward+backward (same FLOPs, no routing)"),
    ("dense_gemm_ms", "dense GEMM ms", "only the dense MLP's 3 forward and 6 backward matmuls (no activation)"),
    ("expert_gemm_ms", "expert GEMM ms", "the same 9 matmuls per expert, one expert after another with all threads "
     "in each matmul, on the layer's own weights and per-expert row counts (no routing, gather, activation or scatter)"),
    ("ours_per_dense_mlp", "ours/MLP", "ours ms / dense MLP ms (1.0 = routing costs nothing)"),
    ("ours_per_dense_mlp_iqr", "ours/MLP IQR", "first and third quartile of ours/MLP over the rounds"),
    ("ours_per_dense_gemm", "ours/GEMM", "ours ms / dense GEMM ms"),
    ("expert_per_dense_gemm", "xGEMM/GEMM", "expert GEMM ms / dense GEMM ms: the cost of E weight sets run that way"),
    ("deepspeed_per_dense_mlp", "ds/MLP", "deepspeed ms / dense MLP ms"),
    ("speedup_vs_deepspeed", "ds/ours", "deepspeed ms / ours ms: our speedup over deepspeed"),
)
RATIOS = {  # ratio key: (numerator, denominator), both time keys
    "ours_per_dense_mlp": ("ours_ms", "dense_mlp_ms"),
    "ours_per_dense_gemm": ("ours_ms", "dense_gemm_ms"),
    "expert_per_dense_gemm": ("expert_gemm_ms", "dense_gemm_ms"),
    "deepspeed_per_dense_mlp": ("deepspeed_ms", "dense_mlp_ms"),
    "speedup_vs_deepspeed": ("deepspeed_ms", "ours_ms"),
}
TIME_KEYS = tuple(key for key, _, _ in COLUMNS if key.endswith("_ms"))
Step = Callable[[], float]


def add_parser(which: argparse._SubParsersAction) -> None:
    layer = which.add_parser("layer", help="MoE layer vs deepspeed.moe vs dense matmuls of equal FLOPs (CPU, fp32)")
    layer.add_argument("--tokens", type=int, default=4096, help="tokens T per forward (default 4096)")
    layer.add_argument("--repeats", type=int, default=11, help="timed rounds; medians are reported (default 11)")
    layer.add_argument("--shapes", default=DEFAULT_SHAPES, help=f'"d,f,E,k;..." (default "{DEFAULT_SHAPES}")')
    layer.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    layer.set_defaults(func=_run_layer)


def _timed(run: Callable[[], None], leaves: list[torch.Tensor]) -> Step:
    """A step that clears the leaves' gradients, then returns the wall time of ``run()``."""

    def step() -> float:
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return step


def _backward_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    def run() -> None:
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return _timed(run, [x, *module.parameters()])


def _dense_mlp_step(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, grad: torch.Tensor) -> Step:
    """The experts' SwiGLU MLP on all of ``x`` (T*k rows) at once, through autograd like ours."""
    return _timed(lambda: ((F.silu(x @ w1) * (x @ w3)) @ w2).backward(grad), [x, w1, w3, w2])


def _dense_gemm_step(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, grad: torch.Tensor) -> Step:
    """Only the matmuls of that MLP, by hand: 3 forward and 6 backward (one fused as an addmm)."""
    x, w1, w3, w2 = (t.detach() for t in (x, w1, w3, w2))

    @torch.no_grad()
    def run() -> None:
        hidden = x @ w1
        outputs = [x @ w3, hidden @ w2]  # forward
        grad_hidden = grad @ w2.t()  # stands in for the gradients of both x @ w1 and x @ w3
        outputs += [hidden.t() @ grad, x.t() @ grad_hidden, x.t() @ grad_hidden]  # weight gradients
        outputs.append(torch.addmm(grad_hidden @ w1.t(), grad_hidden, w3.t()))  # input gradient

    return _timed(run, [])


def _expert_gemm_step(x: torch.Tensor, ours, grad: torch.Tensor) -> Step:
    """The matmuls of ``_dense_gemm_step`` once per expert, one expert after another (each matmul on
    all threads), on contiguous rows in the counts the layer's router gives ``x`` and on the layer's
    own [E, ...] weights: what E weight sets instead of one cost when run that way. (The layer's CPU
    kernel can do better with many experts, by giving each thread whole experts.)"""
    experts = ours.experts
    w1, w3, w2 = (w.detach() for w in (experts.w1, experts.w3, experts.w2))
    with torch.no_grad():
        counts = ours.router(x.detach(), ours.active_experts).tokens_per_expert.tolist()
    rows = torch.randn(sum(counts), x.shape[1]).split(counts)
    grads = torch.randn(sum(counts), x.shape[1]).split(counts)
    # Written in place every step, as the layer reuses its weight-gradient storage: this column
    # counts the matmuls, not fresh allocations.
    grad_w1, grad_w3, grad_w2 = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)

    @torch.no_grad()
    def run() -> None:
        for e, (x_e, grad_e) in enumerate(zip(rows, grads)):
            if not counts[e]:
                continue
            hidden = x_e @ w1[e]
            _ = (x_e @ w3[e], hidden @ w2[e])  # forward
            grad_hidden = grad_e @ w2[e].t()
            torch.mm(hidden.t(), grad_e, out=grad_w2[e])
            torch.mm(x_e.t(), grad_hidden, out=grad_w1[e])
            torch.mm(x_e.t(), grad_hidden, out=grad_w3[e])
            _ = torch.addmm(grad_hidden @ w1[e].t(), grad_hidden, w3[e].t())  # input gradient

    return _timed(run, [])


def _deepspeed_step(ours, k: int, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """DeepSpeed's layer with our router and expert weights copied in, so both route every token
    the same way (its dropless mode pads each expert to the busiest one's load, so the routing
    decides its FLOPs)."""
    from deepspeed.moe.layer import MoE

    from moe.model import DenseFFN

    d, f, experts = ours.config.hidden_size, ours.config.ffn_hidden_size, ours.config.num_experts
    layer = MoE(d, DenseFFN(d, f), num_experts=experts, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                top2_2nd_expert_sampling=False).train()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            for name in ("w1", "w3", "w2"):  # nn.Linear stores [out, in]; ours is [in, out]
                getattr(expert, name).weight.copy_(getattr(ours.experts, name)[e].t())
    step = _backward_step(layer, x, grad)
    step()  # fails here, not mid-measurement, on what DeepSpeed does not support
    return step


def _bench_shape(
    d: int, f: int, experts: int, k: int, tokens: int, repeats: int, deepspeed_error: Optional[str]
) -> dict:
    """One row of the table: the four median times and their ratios for shape (d, f, E, k)."""
    import moe

    torch.manual_seed(0)
    config = moe.MoEConfig(hidden_size=d, ffn_hidden_size=f, num_experts=experts, top_k=k, router="learned",
                           activation="swiglu")
    x, grad = torch.randn(tokens, d, requires_grad=True), torch.randn(tokens, d)
    x_rep, grad_rep = torch.randn(tokens * k, d, requires_grad=True), torch.randn(tokens * k, d)
    w1, w3, w2 = (torch.randn(n, m).div_(math.sqrt(n)).requires_grad_() for n, m in ((d, f), (d, f), (f, d)))

    ours = moe.MoELayer(config).train()
    steps = {"ours_ms": _backward_step(ours, x, grad)}
    if deepspeed_error is None:
        try:
            steps["deepspeed_ms"] = _deepspeed_step(ours, k, x, grad)
        except Exception as err:  # DeepSpeed's limits are a result to report, not a crash
            deepspeed_error = f"{type(err).__name__}: {err}".splitlines()[0]
    steps["dense_mlp_ms"] = _dense_mlp_step(x_rep, w1, w3, w2, grad_rep)
    steps["dense_gemm_ms"] = _dense_gemm_step(x_rep, w1, w3, w2, grad_rep)
    steps["expert_gemm_ms"] = _expert_gemm_step(x, ours, grad)

    times, faults = _round_robin(steps, repeats)
    ratios = {key: [n / d for n, d in zip(times[num], times[den])]  # per round: both taken seconds apart
              for key, (num, den) in RATIOS.items() if num in times and den in times}
    return {
        "shape": {"d": d, "f": f, "E": experts, "k": k},
        **{key: statistics.median(times[key]) if key in times else None for key in TIME_KEYS},
        **{key: statistics.median(ratios[key]) if key in ratios else None for key in RATIOS},
        "ours_per_dense_mlp_iqr": _quartiles(ratios["ours_per_dense_mlp"]),
        "page_faults_per_step": {key: statistics.median(values) for key, values in faults.items()},
        "rounds_ms": times,
        "rounds_page_faults": faults,
        "deepspeed_error": deepspeed_error,
    }


def _round_robin(steps: dict[str, Step], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Milliseconds and minor page faults of each step in each of ``repeats`` rounds (after the
    warm-up), every round running every step once."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    for round_ in range(WARMUP + repeats):
        for name, step in steps.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            elapsed = step()
            if round_ >= WARMUP:
                times[name].append(1e3 * elapsed)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times, faults


def _quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile (both the value itself for one round)."""
    if len(values) == 1:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


class _DeepSpeedProcessGroup:
    """Imports deepspeed for CPU and holds a 1-process gloo group (created here only if none exists).

    ``error`` is None when deepspeed is usable, else why not. With ep_size=1 the layer never
    communicates, so deepspeed's own comm backend (a C++ op built on first use) is not started.
    """

    def __enter__(self) -> "_DeepSpeedProcessGroup":
        self.error, self.created = None, False
        os.environ["DS_ACCELERATOR"] = "cpu"
        try:
            import deepspeed  # noqa: F401
        except Exception as err:
            self.error = f"cannot import deepspeed: {type(err).__name__}: {err}".splitlines()[0]
            return self
        import torch.distributed as dist

        from parallel.engine import free_port, skip_shm_allreduce

        skip_shm_allreduce()
        if not dist.is_initialized():

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            self.created = True
        return self

    def __exit__(self, *exc) -> None:
        if self.created:
            torch.distributed.destroy_process_group()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _cpu_kernel() -> str:
    """Which implementation of the CPU expert MLP ours runs (building the C++ one if need be)."""
    from kernels import cpu_extension

    if cpu_extension.load() is not None:
        return "the C++ CPU expert kernel (kernels/csrc/expert_mlp_cpu.cpp)"
    why = cpu_extension.build_error() or "SLIMMOE_CPU_EXTENSION=0"
    return f"the Python fallback of the CPU expert kernel ({why})"


def _format(value, ratio: bool) -> str:
    if isinstance(value, list):
        return "-".join(f"{v:.2f}" for v in value)
    return "n/a" if value is None else (f"{value:.2f}x" if ratio else f"{value:.2f}")


def _print_table(rows: list[dict]) -> None:
    widths = [max(len(header), 8) for _, header, _ in COLUMNS]
    print(f"{'d,f,E,k':<16}" + "  ".join(f"{header:>{w}}" for (_, header, _), w in zip(COLUMNS, widths)))
    for row in rows:
        cells = [_format(row[key], ratio=not key.endswith("_ms")) for key, _, _ in COLUMNS]
        print(f"{'{d},{f},{E},{k}'.format(**row['shape']):<16}" + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    time_columns = [(key, header.removesuffix(" ms")) for key, header, _ in COLUMNS if key in TIME_KEYS]
    print("\nminor page faults per step (4 KiB pages zero-filled on first touch; median over the rounds):")
    print(f"{'d,f,E,k':<16}" + "  ".join(f"{header:>12}" for _, header in time_columns))
    for row in rows:
        cells = [row["page_faults_per_step"].get(key) for key, _ in time_columns]
        print(f"{'{d},{f},{E},{k}'.format(**row['shape']):<16}"
              + "  ".join(f"{'n/a' if c is None else f'{c:.0f}':>12}" for c in cells))
    for row in rows:
        if row["deepspeed_error"]:
            print(f"deepspeed n/a for {'{d},{f},{E},{k}'.format(**row['shape'])}: {row['deepspeed_error']}")


def _run_layer(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.shapes)
    if args.tokens < 1 or args.repeats < 1:
        raise UserError(f"--tokens and --repeats must be >= 1, got {args.tokens} and {args.repeats}")
    threads, previous_threads = os.cpu_count() or 1, torch.get_num_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = {"torch": torch.__version__, "threads": threads, "cpu": _cpu_model(), "load_avg_1min": load,
              "tokens": args.tokens, "repeats": args.repeats, "warmup": WARMUP, "dtype": "float32", "device": "cpu",
              "ours_cpu_kernel": _cpu_kernel()}
    print(f"moe bench layer: torch {header['torch']}, {threads} threads, CPU {header['cpu']}, "
          f"load average {_format(load, ratio=False)} at start")
    print(f"ours runs {header['ours_cpu_kernel']}")
    print(f"T={args.tokens} tokens, fp32, SwiGLU, forward+backward; {args.repeats} interleaved rounds after "
          f"{WARMUP} warm-up: times are medians, ratios medians of the per-round ratios")
    for _, header_text, definition in COLUMNS:
        print(f"  {header_text:<14} {definition}")
    try:
        with _DeepSpeedProcessGroup() as group:
            rows = [_bench_shape(*shape, args.tokens, args.repeats, group.error) for shape in shapes]
    finally:
        torch.set_num_threads(previous_threads)
    print()
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**header, "results": rows}, out, indent=2)
    return 0
