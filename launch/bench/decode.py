"""``moe bench decode``: milliseconds per decoded token at each k, per decode path, in one run.

The model is built from a run config's ``model`` section with random weights (decode speed does
not depend on what was learned; routing does, so the random router spreads tokens as a trained one
would), on the device in bf16 (GPU) or fp32 (CPU). For each k, after a prefill of ``--prompt-len``
tokens and warm-up steps, ``--tokens`` greedy steps are timed (the device is waited for before each
clock read) with:

    growing     the growing KV cache (``moe.model.KVCache``): a new shape every step, eager
    static      ``moe.decode.StaticDecoder`` without CUDA graphs: fixed shapes, eager
    graph       the same step captured as a CUDA graph and replayed (CUDA only)
    compiled    the step through ``torch.compile(fullgraph=True)``, then captured (CUDA, ``--compile``)

and, on CUDA, the kernels one eager static step launches (torch.profiler). The practical limit:
the weight bytes one step reads at each k (the non-expert weights plus, per MoE layer, the distinct
experts a batch can choose: at most min(E, batch * k)) over the memory bandwidth a plain copy
reaches on the same device in the same run, which is what bounds decoding a large model at batch 1.
Below the table: for each path, decode at the smallest k over decode at the largest (self-slimming
pays when it is well below 1).

    moe bench decode --config configs/tiny.yaml --batch 8
    moe bench decode --config configs/gpu_example.yaml --batch 1 --k 1,64 --set model.num_layers=8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from moe.errors import UserError

PATHS = ("growing", "static", "graph", "compiled")


def add_parser(which: argparse._SubParsersAction) -> None:
    parser = which.add_parser("decode", help="ms per decoded token at each k: growing cache, static cache, CUDA graph")
    parser.add_argument("--config", default="configs/tiny.yaml", help="run config whose model is built (default tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable), e.g. model.num_layers=8")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--k", default=None, help="comma-separated ks (default 1, 2, 4, ... and E)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps per path and k (default 64)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (default 8)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.set_defaults(func=run)


def weight_bytes_per_step(model, k: int, batch: int) -> int:
    """Bytes of weights one decode step reads at k: every non-expert weight, and per MoE layer the
    experts the batch can reach (at most min(E, batch * k) of them; a router and bias are counted
    with the non-expert weights). Tied embeddings count once; the embedding table is a lookup, so
    only its B rows are read."""
    from moe.layer import MoELayer

    expert_params = {id(p) for block in model.blocks if isinstance(block.ffn, MoELayer)
                     for p in block.ffn.experts.parameters()}
    total = 0
    for param in model.parameters():  # unique parameters (tied ones once)
        if id(param) in expert_params:
            continue
        if param is model.embed.weight and param is not model.lm_head.weight:
            total += batch * param.shape[1] * param.element_size()
        else:
            total += param.numel() * param.element_size()
    for block in model.blocks:
        if isinstance(block.ffn, MoELayer):
            experts = block.ffn.experts
            reached = min(experts.num_experts, batch * k)
            total += sum(w[0].numel() * w.element_size() for w in (experts.w1, experts.w3, experts.w2)
                         if w is not None) * reached
    return total


def slimming_ratios(rows: list[dict], paths: tuple[str, ...]) -> dict[str, Optional[float]]:
    """Per path: ms per token at the smallest measured k over that at the largest (None if either is missing)."""
    if len(rows) < 2:
        return {path: None for path in paths}
    low, high = min(rows, key=lambda r: r["k"]), max(rows, key=lambda r: r["k"])
    out = {}
    for path in paths:
        a, b = low.get(f"{path}_ms"), high.get(f"{path}_ms")
        out[path] = a / b if a is not None and b else None
    return out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy moves (read plus write), best of ``repeats``: the
    memory bandwidth a decode step that only reads weights could reach."""
    from moe.devices import synchronize

    source = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def _timed_decode(prefill: Callable, step: Callable, prompt: torch.Tensor, warmup: int, tokens: int,
                  device: torch.device) -> float:
    """Milliseconds per step over ``tokens`` greedy steps after ``warmup`` untimed ones."""
    from moe.devices import synchronize

    logits = prefill(prompt)
    for _ in range(warmup):
        logits = step(logits.argmax(-1, keepdim=True))
    synchronize(device)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = step(logits.argmax(-1, keepdim=True))
    synchronize(device)
    return 1e3 * (time.perf_counter() - start) / tokens


def _count_kernels(step: Callable, token: torch.Tensor) -> int:
    """CUDA kernels launched by one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(token)
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


@torch.no_grad()
def measure(model, ks: list[int], batch: int, prompt_len: int, tokens: int, warmup: int, paths: tuple[str, ...],
            seed: int = 0) -> list[dict]:
    """One row per k: ms per token of each path (``<path>_ms``), weight bytes per step, kernels per step."""
    from moe import set_active_experts
    from moe.decode import StaticDecoder
    from moe.model import KVCache

    device = model.embed.weight.device
    capacity = prompt_len + warmup + tokens + 1
    if capacity > model.config.max_seq_len:
        raise UserError(f"--prompt-len {prompt_len} + --warmup {warmup} + --tokens {tokens} exceed the model's "
                        f"max_seq_len ({model.config.max_seq_len})")
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    decoders = {
        "static": StaticDecoder(model, batch, capacity, cuda_graph=False),
        "graph": StaticDecoder(model, batch, capacity, cuda_graph=True) if "graph" in paths else None,
        "compiled": StaticDecoder(model, batch, capacity, cuda_graph=True, compile=True) if "compiled" in paths else None,
    }
    rows = []
    for k in ks:
        set_active_experts(model, k)
        row = {"k": k, "weight_bytes_per_step": weight_bytes_per_step(model, k, batch)}
        for path in paths:
            if path == "growing":
                cache = [None]

                def prefill(ids, cache=cache):
                    cache[0] = KVCache(len(model.blocks))
                    return model(ids, cache=cache[0])[:, -1]

                def step(token, cache=cache):
                    return model(token, cache=cache[0])[:, -1]

                row["growing_ms"] = _timed_decode(prefill, step, prompt, warmup, tokens, device)
            else:
                decoder = decoders[path]
                row[f"{path}_ms"] = _timed_decode(decoder.prefill, decoder.step, prompt, warmup, tokens, device)
        if device.type == "cuda":
            decoder = decoders["static"]
            decoder.prefill(prompt)
            row["kernels_per_step"] = _count_kernels(decoder.step, prompt[:, :1])
        rows.append(row)
    return rows


def format_table(rows: list[dict], paths: tuple[str, ...], facts: dict) -> str:
    header = ["k"] + [f"{path} ms/token" for path in paths] + ["weights read/step (MB)", "read limit ms"]
    with_kernels = any("kernels_per_step" in row for row in rows)
    if with_kernels:
        header.append("kernels/step (eager)")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        cells = [str(row["k"])] + [f"{row[f'{path}_ms']:.3f}" for path in paths]
        cells.append(f"{row['weight_bytes_per_step'] / 1e6:.1f}")
        cells.append(f"{1e3 * row['weight_bytes_per_step'] / facts['copy_bytes_per_s']:.3f}")
        if with_kernels:
            cells.append(str(row.get("kernels_per_step", "")))
        lines.append(" | ".join(cells))
    ratios = slimming_ratios(rows, paths)
    low, high = min(r["k"] for r in rows), max(r["k"] for r in rows)
    lines.append("")
    lines.append(f"decode at k={low} / decode at k={high}: " + ", ".join(
        f"{path} {ratio:.2f}x" if ratio is not None else f"{path} -" for path, ratio in ratios.items()))
    best = {row["k"]: min(row[f"{path}_ms"] for path in paths) for row in rows}
    lines.append("fastest path per k (ms/token): " + ", ".join(f"k={k} {ms:.3f}" for k, ms in best.items()))
    lines.insert(0, f"moe bench decode: {facts['parameters']:,} parameters, E={facts['num_experts']}, batch "
                    f"{facts['batch']}, prompt {facts['prompt_len']}, {facts['tokens']} timed steps, {facts['dtype']}, "
                    f"{facts['device']}, torch {facts['torch']}; copy bandwidth {facts['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from launch.config import load_run_config
    from launch.slim import parse_ks
    from moe import MoETransformer
    from moe.devices import describe_device, resolve_device

    for name in ("batch", "prompt_len", "tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    cfg = load_run_config(args.config, args.overrides)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).to(device=device, dtype=dtype).eval()
    ks = parse_ks(args.k, cfg.model.moe.max_experts)
    paths = ("growing", "static") + (("graph",) + (("compiled",) if args.compile else ()) if device.type == "cuda" else ())
    if args.compile and device.type != "cuda":
        print("moe bench decode: --compile times the compiled CUDA graph; on the CPU it is skipped")
    rows = measure(model, ks, args.batch, args.prompt_len, args.tokens, args.warmup, paths)
    facts = {"config": str(args.config), "overrides": list(args.overrides), "parameters": model.num_parameters(),
             "num_experts": cfg.model.moe.num_experts, "batch": args.batch, "prompt_len": args.prompt_len,
             "tokens": args.tokens, "dtype": str(dtype).replace("torch.", ""), "device": describe_device(device),
             "torch": torch.__version__, "copy_bytes_per_s": copy_bandwidth(device)}
    print(format_table(rows, paths, facts))
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "rows": rows,
                                               "slimming": slimming_ratios(rows, paths)}, indent=2))
    return 0
