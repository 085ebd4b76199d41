"""``moe bench layer`` times forward + backward of one MoE layer (T tokens) for a few shapes
(d, f, E, k[, T]), against the dropless MoE of DeepSpeed and against dense work of the same FLOPs, on
the CPU (fp32, SwiGLU by default) or on a CUDA GPU (bf16, GELU by default: issue 17's table):

    ours        ``moe.MoELayer`` (learned router, dropless, its default expert backend "auto") in
                train mode: ``layer(x).backward(g)``
    deepspeed   ``deepspeed.moe.layer.MoE``, dropless (drop_tokens=False, use_rts=False, no 2nd-expert
                sampling, ep_size=1), each expert the same bias-free MLP (SwiGLU: ``moe.model.DenseFFN``;
                GELU: :class:`GeluMLP`), with our router and expert weights copied in so both layers
                route every token identically
    dense MLP   that MLP applied to T*k rows: the experts' FLOPs with no routing or dispatch
    dense GEMM  only its matmuls (SwiGLU 3 forward + 6 backward, GELU 2 + 4): the same FLOPs, nothing
                elementwise
    expert GEMM (CPU only) the dense GEMM's matmuls once per expert on the layer's own weights

The two dense columns are the practical limits. Every backward takes a fixed random gradient, and
gradients are cleared (untimed) before each call. After 2 warm-up rounds the candidates run
round-robin, ``--repeats`` rounds, so drift hits all of them alike. Each time is the median over
the rounds; each ratio is the median of that round's ratios (the two times in a ratio were taken
seconds apart, so a noisy neighbour slows both), printed with the interquartile range of the
ours/MLP ratio to show how much the machine moved. With one round a ratio is the quotient of the
two printed times.

Timing: wall time of one step, with the device synchronised (``moe.devices.synchronize``: all queued
GPU work done; nothing to do on the CPU) right before the start clock is read and right after the
step, before the end clock is read. Nothing inside the step synchronises on our side.

On CUDA everything (inputs, weights, gradients) lives on the device in ``--dtype`` (bf16 by default).
Both routers stay fp32: ours keeps its weight fp32 through ``.to(bf16)``, and DeepSpeed's gate
computes its logits in fp32 anyway (``input.float() @ wg.weight.float()``), so its gate module is
cast back to fp32 after the layer is cast: the two compute the same fp32 logits and pick the same
experts; the experts run in ``--dtype``.

DeepSpeed on one device: the layer is built with ep_size=1 and ``set_deepspeed_parallelism()`` is
never called, so its expert-parallel group stays None; DeepSpeed 0.19.8 then never communicates
(``pg_utils.is_parallel(None)`` is False, the all-to-alls are skipped at ep_size=1, and with no
``groups.mpu`` the tensor-parallel size is 1). No collective runs on any device. As a guard for
code that asks for the rank or world size, a 1-process gloo world on a free localhost port is
created when no process group exists (the same on CPU and CUDA; gloo needs no GPU and is never
given a CUDA tensor). ``DS_ACCELERATOR`` is set to the device type before deepspeed is imported.

Below the table, on the CPU only, the minor page faults of each column per step (median over the
rounds): every one is a 4 KiB page the kernel maps and zero-fills on first touch. glibc serves
allocations of 32 MiB or more with a fresh ``mmap`` each time (and smaller ones whenever it has
handed freed heap memory back to the system), so a step that allocates such a buffer (the weight
gradient of E experts, T*k rows of activations) pays for zeroing it on every call: allocator cost,
not compute, and this table shows which columns carry it. (On CUDA the caching allocator serves
device memory; host page faults say nothing there, so they are not counted.)
"""

from __future__ import annotations

import argparse
import gc
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

from launch.bench.profiling import profile_calls, short_name
from launch.bench.shapes import parse_shapes
from moe.errors import UserError

DEFAULT_SHAPES = "256,512,8,2;256,128,64,6;512,1024,16,1"  # on the CPU, T from --tokens
# On CUDA: issue 17's table (Mixtral-like, DeepSeek-like fine-grained, fine-grained at twice the tokens).
DEFAULT_SHAPES_CUDA = "4096,14336,8,2,8192;2048,1408,64,6,8192;1024,512,64,2,16384"
DEFAULT_TOKENS = 4096
ACTIVATIONS = ("swiglu", "gelu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_OURS_PER_DENSE_MLP = 1.3  # issue 17, target 0: ours <= 1.3x the dense MLP and faster than deepspeed
WARMUP = 2
COLUMNS = (  # (key, header, definition)
    ("ours_ms", "ours ms", "moe.MoELayer forward+backward, median wall time"),
    ("ours_host_ms", "ours host ms", "CUDA only: the host's part of ours ms, until forward+backward returned (the "
     "device was synchronised before the call, not yet after it): close to ours ms, the GPU waited for the launches"),
    ("torch_routing_ms", "torch-routing ms", "CUDA only: ours with the router's selection and the grouping by "
     "expert in torch ops (top-k, softmax, argsort, ...) instead of the Triton routing kernels "
     "(kernels.routing_kernels(False))"),
    ("deepspeed_ms", "deepspeed ms", "deepspeed.moe.layer.MoE (dropless, same experts and routing) forward+backward"),
    ("dense_mlp_ms", "dense MLP ms", "the same dense MLP on T*k rows forward+backward (same FLOPs, no routing)"),
    ("dense_gemm_ms", "dense GEMM ms", "only the dense MLP's forward and backward matmuls (SwiGLU 3+6, GELU 2+4; "
     "no activation)"),
    ("expert_gemm_ms", "expert GEMM ms", "CPU only: the same matmuls per expert, one expert after another with all "
     "threads in each matmul, on the layer's own weights and per-expert row counts (no routing, gather, activation "
     "or scatter)"),
    ("ours_per_dense_mlp", "ours/MLP", "ours ms / dense MLP ms (1.0 = routing costs nothing)"),
    ("ours_per_dense_mlp_iqr", "ours/MLP IQR", "first and third quartile of ours/MLP over the rounds"),
    ("ours_per_dense_gemm", "ours/GEMM", "ours ms / dense GEMM ms"),
    ("expert_per_dense_gemm", "xGEMM/GEMM", "expert GEMM ms / dense GEMM ms: the cost of E weight sets run that way"),
    ("deepspeed_per_dense_mlp", "ds/MLP", "deepspeed ms / dense MLP ms"),
    ("speedup_vs_deepspeed", "ds/ours", "deepspeed ms / ours ms: our speedup over deepspeed"),
    ("routing_kernel_speedup", "tr/ours", "torch-routing ms / ours ms: what the routing kernels save"),
)
RATIOS = {  # ratio key: (numerator, denominator), both time keys
    "ours_per_dense_mlp": ("ours_ms", "dense_mlp_ms"),
    "ours_per_dense_gemm": ("ours_ms", "dense_gemm_ms"),
    "expert_per_dense_gemm": ("expert_gemm_ms", "dense_gemm_ms"),
    "deepspeed_per_dense_mlp": ("deepspeed_ms", "dense_mlp_ms"),
    "speedup_vs_deepspeed": ("deepspeed_ms", "ours_ms"),
    "routing_kernel_speedup": ("torch_routing_ms", "ours_ms"),
}
TIME_KEYS = tuple(key for key, _, _ in COLUMNS if key.endswith("_ms"))
SHAPE_HEADER = "d,f,E,k,T"
PROFILE_CALLS = 3
PROFILE_TOP = 8
PROFILED = ("ours_ms", "dense_mlp_ms")  # the columns profiled when --profile-calls > 0


def add_parser(which: argparse._SubParsersAction) -> None:
    layer = which.add_parser("layer", help="MoE layer vs deepspeed.moe vs dense matmuls of equal FLOPs "
                                           "(CPU fp32, or CUDA bf16)")
    layer.add_argument("--device", default=None, help="auto (default: the GPU when there is one), cpu, cuda, cuda:N")
    layer.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="default: bf16 on CUDA, fp32 on the CPU")
    layer.add_argument("--activation", choices=ACTIVATIONS, default=None,
                       help="the experts' activation, the same in every column (default: gelu on CUDA, as issue 17's "
                            "table; swiglu on the CPU)")
    layer.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                       help=f"tokens T per forward for shapes that give no T (default {DEFAULT_TOKENS})")
    layer.add_argument("--repeats", type=int, default=11, help="timed rounds; medians are reported (default 11)")
    layer.add_argument("--shapes", default=None,
                       help=f'"d,f,E,k[,T];..." (default on the CPU "{DEFAULT_SHAPES}" with T from --tokens; '
                            f'on CUDA "{DEFAULT_SHAPES_CUDA}")')
    layer.add_argument("--profile-calls", type=int, default=PROFILE_CALLS,
                       help=f"after the timing, torch.profiler over this many more calls of ours and of the dense MLP "
                            f"per shape: kernels per call, the GPU's busy time, ours' top kernels (default "
                            f"{PROFILE_CALLS}; 0: no profile)")
    layer.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    layer.set_defaults(func=_run_layer)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers


def parse_layer_shapes(text: str, tokens: int) -> list[tuple[int, int, int, int, int]]:
    """``"d,f,E,k[,T];..."`` -> [(d, f, E, k, T), ...]; a shape without T gets ``tokens``. A
    ValueError names the bad item."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        count = len(item.split(","))
        if count not in (4, 5):
            raise UserError(f'--shapes: {item!r} is not "d,f,E,k[,T]" with four or five positive integers')
        (shape,) = parse_shapes(item, "d,f,E,k" if count == 4 else SHAPE_HEADER)
        shapes.append(shape if count == 5 else (*shape, tokens))
    if not shapes:
        raise UserError('--shapes: no shape given; expected "d,f,E,k[,T];..."')
    return shapes


def resolve_options(device: Optional[str], dtype: Optional[str], activation: Optional[str], shapes: Optional[str],
                    tokens: int) -> tuple[torch.device, torch.dtype, str, list[tuple[int, int, int, int, int]]]:
    """The run's device, dtype, activation and shapes, each option's default depending on the device."""
    from moe.devices import resolve_device

    if tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    resolved = resolve_device(device)
    cuda = resolved.type == "cuda"
    dtype = DTYPES[dtype or ("bf16" if cuda else "fp32")]
    activation = activation or ("gelu" if cuda else "swiglu")
    return resolved, dtype, activation, parse_layer_shapes(shapes or (DEFAULT_SHAPES_CUDA if cuda else DEFAULT_SHAPES),
                                                           tokens)


def shape_label(shape: dict) -> str:
    return "{d},{f},{E},{k},{T}".format(**shape)


def dense_mlp(x: torch.Tensor, w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor) -> torch.Tensor:
    """The bias-free expert MLP on every row of ``x``: ``(silu(x @ w1) * (x @ w3)) @ w2`` (SwiGLU) or,
    when ``w3`` is None, ``gelu(x @ w1) @ w2`` (exact GELU, as the experts)."""
    if w3 is not None:
        return (F.silu(x @ w1) * (x @ w3)) @ w2
    return F.gelu(x @ w1) @ w2


class GeluMLP(nn.Module):
    """A bias-free GELU MLP, one DeepSpeed expert (the GELU counterpart of ``moe.model.DenseFFN``)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def expert_module(hidden: int, ffn: int, activation: str) -> nn.Module:
    """One DeepSpeed expert computing what our experts compute."""
    if activation == "swiglu":
        from moe.model import DenseFFN

        return DenseFFN(hidden, ffn)
    if activation == "gelu":
        return GeluMLP(hidden, ffn)
    raise UserError(f"--activation {activation!r} is not one of {ACTIVATIONS}")


def build_ours(d: int, f: int, experts: int, k: int, activation: str, device: torch.device,
               dtype: torch.dtype) -> nn.Module:
    """``moe.MoELayer`` (learned router, dropless, default expert backend), built on ``device`` and cast
    to ``dtype`` (its router stays fp32), in train mode."""
    import moe

    config = moe.MoEConfig(hidden_size=d, ffn_hidden_size=f, num_experts=experts, top_k=k, router="learned",
                           activation=activation)
    with torch.device(device):
        layer = moe.MoELayer(config)
    return layer.to(dtype).train()


def build_deepspeed(ours: nn.Module, k: int) -> nn.Module:
    """DeepSpeed's layer on ``ours``' device and dtype, with our router and expert weights copied in,
    so both route every token the same way (its dropless mode pads each expert to the busiest one's
    load, so the routing decides its FLOPs). Its gate is kept fp32, as ours."""
    from deepspeed.moe.layer import MoE

    config = ours.config
    d, f, experts = config.hidden_size, config.ffn_hidden_size, config.num_experts
    reference = ours.experts.w1
    with torch.device(reference.device):
        layer = MoE(d, expert_module(d, f, config.activation), num_experts=experts, ep_size=1, k=k,
                    drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    layer = layer.to(reference.dtype)
    layer.deepspeed_moe.gate.float()  # it computes in fp32 whatever its weight's dtype: keep the weight fp32 too
    names = ("w1", "w3", "w2") if config.activation == "swiglu" else ("w1", "w2")
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            for name in names:  # nn.Linear stores [out, in]; ours is [in, out]
                getattr(expert, name).weight.copy_(getattr(ours.experts, name)[e].t())
    return layer.train()


def auto_expert_path(ours: nn.Module, x: torch.Tensor, k: int) -> str:
    """The expert path ``ours`` takes on ``x`` (with its default backend "auto":
    ``kernels.expert_mlp.choose_backend`` on the layer's inputs: the T tokens, T*k grouped rows)."""
    from launch.bench.kernels import auto_backend_choice, describe_backend

    experts = ours.experts
    backend = experts.backend
    if backend == "auto":
        backend = auto_backend_choice(x, x.shape[0] * k, experts.w1, experts.w3)
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    text = describe_backend(backend, x.device.type, experts.w1.shape[1], experts.w1.shape[2], capability)
    if x.device.type == "cpu" and backend == "torch":
        text = f"torch: {_cpu_kernel(x.dtype)}"
    return f"auto -> {text}" if experts.backend == "auto" else text


def target_0_check(row: dict) -> str:
    """Issue 17's target 0 for one row, from its printed ratios: ours/MLP <= 1.3 and ds/ours > 1."""
    ours = row["ours_per_dense_mlp"]
    versus = row["speedup_vs_deepspeed"]
    first = "n/a" if ours is None else ("yes" if ours <= TARGET_OURS_PER_DENSE_MLP else "NO")
    second = "n/a" if versus is None else ("yes" if versus > 1.0 else "NO")
    return f"ours/MLP <= {TARGET_OURS_PER_DENSE_MLP}: {first}; faster than deepspeed: {second}"


# ----------------------------------------------------------------------------------------------------------------
# Steps


class Step:
    """Calling it clears the leaves' gradients, then returns the wall time of ``run()`` with the device
    synchronised before the start clock and before the end clock (no sync inside ``run``);
    ``last_host_s`` is the part until ``run()`` returned, before that last sync."""

    def __init__(self, run: Callable[[], None], leaves: list[torch.Tensor], device: torch.device):
        self.run, self.leaves, self.device = run, leaves, device
        self.last_host_s: Optional[float] = None

    def clear(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self) -> float:
        from moe.devices import synchronize

        self.clear()
        synchronize(self.device)
        start = time.perf_counter()
        self.run()
        self.last_host_s = time.perf_counter() - start
        synchronize(self.device)
        return time.perf_counter() - start


def _backward_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    def run() -> None:
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return Step(run, [x, *module.parameters()], x.device)


def _dense_mlp_step(x: torch.Tensor, w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor,
                    grad: torch.Tensor) -> Step:
    """The experts' MLP on all of ``x`` (T*k rows) at once, through autograd like ours."""
    leaves = [t for t in (x, w1, w3, w2) if t is not None]
    return Step(lambda: dense_mlp(x, w1, w3, w2).backward(grad), leaves, x.device)


def _dense_gemm_step(x: torch.Tensor, w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor,
                     grad: torch.Tensor) -> Step:
    """Only the matmuls of that MLP, by hand: SwiGLU 3 forward and 6 backward (one fused as an
    addmm), GELU 2 forward and 4 backward."""
    x, w1, w2 = (t.detach() for t in (x, w1, w2))
    w3 = None if w3 is None else w3.detach()

    @torch.no_grad()
    def run() -> None:
        hidden = x @ w1
        outputs = [hidden @ w2]  # forward
        grad_hidden = grad @ w2.t()  # for SwiGLU it stands in for the gradients of both x @ w1 and x @ w3
        outputs += [hidden.t() @ grad, x.t() @ grad_hidden]  # weight gradients of w2 and w1
        if w3 is None:
            outputs.append(grad_hidden @ w1.t())  # input gradient
        else:
            outputs += [x @ w3, x.t() @ grad_hidden]  # the third forward matmul, the gradient of w3
            outputs.append(torch.addmm(grad_hidden @ w1.t(), grad_hidden, w3.t()))  # input gradient

    return Step(run, [], x.device)


def _expert_gemm_step(x: torch.Tensor, ours, grad: torch.Tensor) -> Step:
    """(CPU.) The matmuls of ``_dense_gemm_step`` once per expert, one expert after another (each
    matmul on all threads), on contiguous rows in the counts the layer's router gives ``x`` and on
    the layer's own [E, ...] weights: what E weight sets instead of one cost when run that way. (The
    layer's CPU kernel can do better with many experts, by giving each thread whole experts.)"""
    experts = ours.experts
    w1, w2 = experts.w1.detach(), experts.w2.detach()
    w3 = None if experts.w3 is None else experts.w3.detach()
    with torch.no_grad():
        counts = ours.router(x.detach(), ours.active_experts).tokens_per_expert.tolist()
    opts = {"device": x.device, "dtype": x.dtype}
    rows = torch.randn(sum(counts), x.shape[1], **opts).split(counts)
    grads = torch.randn(sum(counts), x.shape[1], **opts).split(counts)
    # Written in place every step, as the layer reuses its weight-gradient storage: this column
    # counts the matmuls, not fresh allocations.
    grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
    grad_w3 = None if w3 is None else torch.empty_like(w3)

    @torch.no_grad()
    def run() -> None:
        for e, (x_e, grad_e) in enumerate(zip(rows, grads)):
            if not counts[e]:
                continue
            hidden = x_e @ w1[e]
            _ = hidden @ w2[e]  # forward
            grad_hidden = grad_e @ w2[e].t()
            torch.mm(hidden.t(), grad_e, out=grad_w2[e])
            torch.mm(x_e.t(), grad_hidden, out=grad_w1[e])
            if w3 is None:
                _ = grad_hidden @ w1[e].t()  # input gradient
            else:
                _ = x_e @ w3[e]
                torch.mm(x_e.t(), grad_hidden, out=grad_w3[e])
                _ = torch.addmm(grad_hidden @ w1[e].t(), grad_hidden, w3[e].t())  # input gradient

    return Step(run, [], x.device)


def _torch_routing_step(ours: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """Ours with the routing kernels switched off for the call (the torch path they replace)."""
    from kernels.routing import routing_kernels

    def run() -> None:
        with routing_kernels(False):
            ours(x).backward(grad)

    return Step(run, [x, *ours.parameters()], x.device)


def _deepspeed_step(ours, k: int, x: torch.Tensor, grad: torch.Tensor) -> Step:
    step = _backward_step(build_deepspeed(ours, k), x, grad)
    step()  # fails here, not mid-measurement, on what DeepSpeed does not support
    return step


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def _bench_shape(d: int, f: int, experts: int, k: int, tokens: int, repeats: int, deepspeed_error: Optional[str],
                 device: torch.device, dtype: torch.dtype, activation: str, profile_calls_per_shape: int = 0) -> dict:
    """One row of the table: the median times and their ratios for shape (d, f, E, k, T)."""
    torch.manual_seed(0)
    opts = {"device": device, "dtype": dtype}
    x, grad = torch.randn(tokens, d, **opts).requires_grad_(), torch.randn(tokens, d, **opts)
    x_rep, grad_rep = torch.randn(tokens * k, d, **opts).requires_grad_(), torch.randn(tokens * k, d, **opts)
    w1, w3, w2 = (torch.randn(n, m, **opts).div_(math.sqrt(n)).requires_grad_() for n, m in ((d, f), (d, f), (f, d)))
    if activation != "swiglu":
        w3 = None

    ours = build_ours(d, f, experts, k, activation, device, dtype)
    expert_path = auto_expert_path(ours, x, ours.active_experts)
    steps = {"ours_ms": _backward_step(ours, x, grad)}
    if device.type == "cuda":
        steps["torch_routing_ms"] = _torch_routing_step(ours, x, grad)
    if deepspeed_error is None:
        try:
            steps["deepspeed_ms"] = _deepspeed_step(ours, k, x, grad)
        except Exception as err:  # DeepSpeed's limits are a result to report, not a crash
            deepspeed_error = f"{type(err).__name__}: {err}".splitlines()[0]
    steps["dense_mlp_ms"] = _dense_mlp_step(x_rep, w1, w3, w2, grad_rep)
    steps["dense_gemm_ms"] = _dense_gemm_step(x_rep, w1, w3, w2, grad_rep)
    if device.type == "cpu":
        steps["expert_gemm_ms"] = _expert_gemm_step(x, ours, grad)

    cuda = device.type == "cuda"
    times, faults, hosts = _round_robin(steps, repeats, count_faults=not cuda)
    if cuda:
        times["ours_host_ms"] = hosts["ours_ms"]
    profiles = {key: profile_calls(steps[key].run, profile_calls_per_shape, device, PROFILE_TOP, steps[key].clear)
                for key in PROFILED if profile_calls_per_shape > 0}
    ratios = {key: [n / d for n, d in zip(times[num], times[den])]  # per round: both taken seconds apart
              for key, (num, den) in RATIOS.items() if num in times and den in times}
    return {
        "shape": {"d": d, "f": f, "E": experts, "k": k, "T": tokens},
        **{key: statistics.median(times[key]) if key in times else None for key in TIME_KEYS},
        **{key: statistics.median(ratios[key]) if key in ratios else None for key in RATIOS},
        "ours_per_dense_mlp_iqr": _quartiles(ratios["ours_per_dense_mlp"]),
        "page_faults_per_step": {key: statistics.median(values) for key, values in faults.items()},
        "rounds_ms": times,
        "rounds_page_faults": faults,
        "ours_expert_path": expert_path,
        "deepspeed_error": deepspeed_error,
        "profiles": profiles,
    }


def _round_robin(steps: dict[str, Step], repeats: int, count_faults: bool = True
                 ) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, list[float]]]:
    """Milliseconds (and, if ``count_faults``, minor page faults) of each step in each of ``repeats``
    rounds (after the warm-up), every round running every step once; and each step's host
    milliseconds (its ``last_host_s``)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    hosts: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps} if count_faults else {}
    for round_ in range(WARMUP + repeats):
        for name, step in steps.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if count_faults else 0
            elapsed = step()
            if round_ >= WARMUP:
                times[name].append(1e3 * elapsed)
                hosts[name].append(1e3 * step.last_host_s)
                if count_faults:
                    faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times, faults, hosts


def _quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile (both the value itself for one round)."""
    if len(values) == 1:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


class _DeepSpeedProcessGroup:
    """Imports deepspeed for ``device`` and holds a 1-process gloo group (created here only if none
    exists).

    ``error`` is None when deepspeed is usable, else why not. With ep_size=1 the layer never
    communicates (see the module docstring), so the group is only a guard, and deepspeed's own comm
    backend (on the CPU a C++ op built on first use) is not started.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def __enter__(self) -> "_DeepSpeedProcessGroup":
        self.error, self.created = None, False
        os.environ["DS_ACCELERATOR"] = "cuda" if self.device.type == "cuda" else "cpu"
        from parallel.engine import normalize_cuda_arch_list

        normalize_cuda_arch_list()  # as the training job does before importing deepspeed
        try:
            import deepspeed  # noqa: F401
        except Exception as err:
            self.error = f"cannot import deepspeed: {type(err).__name__}: {err}".splitlines()[0]
            return self
        import torch.distributed as dist

        from parallel.engine import free_port, skip_shm_allreduce

        skip_shm_allreduce()  # as the training job does; nothing here builds or uses that op
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


def _cpu_kernel(dtype: torch.dtype = torch.float32) -> str:
    """Which implementation of the CPU expert MLP ours runs (building the C++ one if need be)."""
    from kernels import cpu_extension

    if dtype != torch.float32:
        return f"the Python CPU expert kernel (the C++ one is fp32 only, this run is {dtype})"
    if cpu_extension.load() is not None:
        return "the C++ CPU expert kernel (kernels/csrc/expert_mlp_cpu.cpp)"
    why = cpu_extension.build_error() or "SLIMMOE_CPU_EXTENSION=0"
    return f"the Python fallback of the CPU expert kernel ({why})"


def _format(value, ratio: bool) -> str:
    if isinstance(value, list):
        return "-".join(f"{v:.2f}" for v in value)
    return "n/a" if value is None else (f"{value:.2f}x" if ratio else f"{value:.2f}")


def _print_table(rows: list[dict], device: torch.device) -> None:
    widths = [max(len(header), 8) for _, header, _ in COLUMNS]
    print(f"{SHAPE_HEADER:<22}" + "  ".join(f"{header:>{w}}" for (_, header, _), w in zip(COLUMNS, widths)))
    for row in rows:
        cells = [_format(row[key], ratio=not key.endswith("_ms")) for key, _, _ in COLUMNS]
        print(f"{shape_label(row['shape']):<22}" + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print("\nours' expert path (its default backend; kernels.expert_mlp.choose_backend on the layer's inputs):")
    for row in rows:
        print(f"  {shape_label(row['shape'])}: {row['ours_expert_path']}")
    print("\nissue 17 target 0 (stated for CUDA, bf16, GELU, the default CUDA shapes), from the ratios above:")
    for row in rows:
        print(f"  {shape_label(row['shape'])}: {target_0_check(row)}")
    _print_profiles(rows)
    if device.type == "cpu":
        time_columns = [(key, header.removesuffix(" ms")) for key, header, _ in COLUMNS
                        if key in TIME_KEYS and key != "ours_host_ms"]
        print("\nminor page faults per step (4 KiB pages zero-filled on first touch; median over the rounds):")
        print(f"{SHAPE_HEADER:<22}" + "  ".join(f"{header:>12}" for _, header in time_columns))
        for row in rows:
            cells = [row["page_faults_per_step"].get(key) for key, _ in time_columns]
            print(f"{shape_label(row['shape']):<22}"
                  + "  ".join(f"{'n/a' if c is None else f'{c:.0f}':>12}" for c in cells))
    else:
        print("\nminor page faults: counted on the CPU only (device memory comes from the CUDA caching allocator); "
              "expert GEMM: CPU only")
    for row in rows:
        if row["deepspeed_error"]:
            print(f"deepspeed n/a for {shape_label(row['shape'])}: {row['deepspeed_error']}")


def profile_summary(row: dict) -> Optional[dict]:
    """From a row's profiles: ours' and the dense MLP's profiled time and kernels per call, and on CUDA
    ours' kernel time over its timed ms (the GPU's busy share of ours' wall time). None without
    profiles."""
    profiles = row.get("profiles") or {}
    if not profiles:
        return None
    ours, dense = profiles.get("ours_ms"), profiles.get("dense_mlp_ms")
    busy = ours["total_ms_per_step"] if ours else None
    return {
        "ours_profiled_ms": busy,
        "ours_calls": ours["calls_per_step"] if ours else None,
        # on the CPU the ops' self times overlap (the expert kernel's threads) and include the profiler's cost
        "ours_busy_share": (busy / row["ours_ms"] if busy is not None and row.get("ours_ms")
                            and ours["what"].startswith("CUDA") else None),
        "dense_profiled_ms": dense["total_ms_per_step"] if dense else None,
        "dense_calls": dense["calls_per_step"] if dense else None,
    }


def _print_profiles(rows: list[dict]) -> None:
    summaries = [(row, profile_summary(row)) for row in rows]
    summaries = [(row, summary) for row, summary in summaries if summary is not None]
    if not summaries:
        return
    first = summaries[0][0]["profiles"]["ours_ms"]
    what = first["what"]
    gpu = what.startswith("CUDA")
    busy = "GPU busy ms" if gpu else "profiled ms"
    print(f"\nwhere the time goes (torch.profiler over {first['steps']} more calls per shape; {what}; per call):")
    unit = "kernels" if gpu else "ops"
    legend = [(f"ours {busy}", f"the {unit}' total time in one ours forward+backward (MLP: the dense MLP's)")]
    if gpu:
        legend.append(("busy share", f"ours {busy} / ours ms: the rest of ours ms the GPU waited"))
    legend.append((f"ours {unit}", f"{'kernels launched' if gpu else 'ops run'} per call"))
    for name, text in legend:
        print(f"  {name:<18} {text}")
    headers = [f"ours {busy}", "busy share", "ours " + ("kernels" if gpu else "ops"),
               f"MLP {busy}", "MLP " + ("kernels" if gpu else "ops")]
    widths = [max(len(h), 9) for h in headers]
    print(f"{SHAPE_HEADER:<22}" + "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths)))
    for row, summary in summaries:
        share = summary["ours_busy_share"]
        cells = [_format(summary["ours_profiled_ms"], ratio=False), "n/a" if share is None else f"{share:.0%}",
                 _format(summary["ours_calls"], ratio=False).removesuffix(".00"),
                 _format(summary["dense_profiled_ms"], ratio=False),
                 _format(summary["dense_calls"], ratio=False).removesuffix(".00")]
        print(f"{shape_label(row['shape']):<22}" + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for row, _ in summaries:
        ours = row["profiles"]["ours_ms"]
        print(f"\ntop {'kernels' if gpu else 'ops'} of ours at {shape_label(row['shape'])} (ms per call, share of "
              f"ours {busy}, calls per call):")
        for i, kernel in enumerate(ours["kernels"], 1):
            share = "n/a" if kernel["share"] is None else f"{kernel['share']:.1%}"
            print(f"  {i:>2}  {kernel['ms_per_step']:8.3f}  {share:>6}  {kernel['calls_per_step']:6.3g}  "
                  f"{short_name(kernel['name'], 100)}")


def _run_layer(args: argparse.Namespace) -> int:
    from moe.devices import describe_device

    device, dtype, activation, shapes = resolve_options(args.device, args.dtype, args.activation, args.shapes,
                                                        args.tokens)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.profile_calls < 0:
        raise UserError(f"--profile-calls must be >= 0, got {args.profile_calls}")
    threads, previous_threads = os.cpu_count() or 1, torch.get_num_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    header = {"torch": torch.__version__, "threads": threads, "cpu": _cpu_model(), "load_avg_1min": load,
              "tokens": args.tokens, "repeats": args.repeats, "warmup": WARMUP, "dtype": str(dtype).removeprefix(
                  "torch."), "device": str(device), "device_name": describe_device(device), "activation": activation,
              "ours_cpu_kernel": _cpu_kernel(dtype) if device.type == "cpu" else None}
    print(f"moe bench layer: torch {header['torch']} on {header['device_name']}; CPU {header['cpu']} ({threads} "
          f"threads), load average {_format(load, ratio=False)} at start")
    if header["ours_cpu_kernel"]:
        print(f"ours runs {header['ours_cpu_kernel']}")
    print(f"{dtype_name}, {activation} experts, forward+backward; {args.repeats} interleaved rounds after {WARMUP} "
          "warm-up: times are medians (device synchronised around each step), ratios medians of the per-round ratios")
    for _, header_text, definition in COLUMNS:
        print(f"  {header_text:<14} {definition}")
    try:
        with _DeepSpeedProcessGroup(device) as group:
            rows = []
            for shape in shapes:
                rows.append(_bench_shape(*shape, args.repeats, group.error, device, dtype, activation,
                                         args.profile_calls))
                if device.type == "cuda":  # the next shape starts from an empty cache
                    gc.collect()
                    torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(previous_threads)
    print()
    _print_table(rows, device)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**header, "results": rows}, out, indent=2)
    return 0
