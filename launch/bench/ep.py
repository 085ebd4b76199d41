"""``moe bench ep``: training-step time and all-to-all cost at EP=1 and EP=2, on 2 ranks, and at EP=2
with the all-to-all overlapped with expert compute.

The command starts 2 ranks with the deepspeed launcher (CPU and gloo without a GPU); each rank runs
this module's :func:`main`. For ``tiny.yaml`` and for a fine-grained variant of it (64 narrow
experts, top-6), and for expert-parallel sizes 1 and 2, it builds the model from one seed, wraps
it in the DeepSpeed engine the trainer uses, and times full training steps (forward, auxiliary
losses, backward, gradient reduction, AdamW, bias update) on random tokens; then again at EP=2
for each ``--chunks`` count (``model.moe.a2a_overlap_chunks``). It reports

    chunks         1: the serial exchange; n: n chunks of local experts, the exchange of one chunk
                   in flight while the experts compute another (forward and backward)
    step ms        median over ranks of each step's wall time (the slowest rank per step)
    a2a ms         time an all-to-all was under way per step (counts, dispatch, combine, and both in
                   backward; overlapped: from issue to completion, the union of those spans)
    not hidden     a2a not hidden, ms per step: time the rank's thread was blocked by all-to-all
                   (serial: all of a2a ms; overlapped: issuing, and waiting on handles)
    wait ms        with --line-up, serial EP=2 only: time in the barrier before each exchange, the
                   waiting for the slower rank, which a2a ms then leaves out (- otherwise)
    a2a share      a2a ms / step ms
    MB sent        bytes of token rows each rank sent to the other per step, as counted by the dispatcher
    formula MB     4 * L * T * k * d * bytes * (P - 1) / P: the same volume for perfectly balanced routing
                   (dispatch and combine, forward and backward; T tokens per rank, L MoE layers)
    |dloss| |dgrad| largest difference to the serial EP=2 model of the loss and of any gradient
                   element, one forward and backward of the same batch from the same weights (max over ranks)

All figures are measured in this run; nothing is copied from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moe.errors import UserError

CONFIGS = {
    "tiny": ["model.moe.k_schedule=constant"],
    "fine-grained": ["model.moe.num_experts=64", "model.moe.top_k=6", "model.moe.ffn_hidden_size=32",
                     "model.moe.k_schedule=constant"],
}
COLUMNS = ("step_ms", "a2a_ms", "blocked_ms", "wait_ms", "a2a_share", "mb_sent", "formula_mb")
DEFAULT_CHUNKS = "2,4"


def all_to_all_bytes_per_step(moe_layers: int, tokens: int, top_k: int, hidden: int, dtype_bytes: int, ep: int) -> float:
    """Bytes one rank sends per training step with perfectly balanced routing: each of its
    ``tokens * top_k`` assignments leaves the rank with probability (P-1)/P, twice forward
    (dispatch, combine) and twice backward, once per MoE layer."""
    return 4.0 * moe_layers * tokens * top_k * hidden * dtype_bytes * (ep - 1) / ep


def add_parser(which: argparse._SubParsersAction) -> None:
    parser = which.add_parser("ep", help="training step time and all-to-all cost at EP=1 and EP=2 on 2 ranks")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--chunks", default=DEFAULT_CHUNKS, metavar="N[,N...]",
                        help=f"overlapped EP=2 cases: a2a_overlap_chunks values >= 2, comma-separated, or 'none' "
                             f"(default {DEFAULT_CHUNKS})")
    parser.add_argument("--line-up", action="store_true",
                        help="serial EP=2 cases: a barrier before each all-to-all, so that a2a ms is the exchange "
                             "alone and the waiting for the slower rank is reported apart (wait ms); moe plan "
                             "--validate measures this way")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.set_defaults(func=run_cli)


def parse_chunks(text: str) -> list:
    """``"2,4"`` -> ``[2, 4]``; ``"none"`` -> ``[]``. Anything else than integers >= 2 is a UserError."""
    if text.strip().lower() == "none":
        return []
    try:
        chunks = [int(part) for part in text.split(",")]
    except ValueError:
        chunks = []
    if not chunks or any(n < 2 for n in chunks) or len(set(chunks)) != len(chunks):
        raise UserError(f"--chunks {text!r} is invalid: expected distinct integers >= 2, comma-separated "
                        "(e.g. 2,4), or none")
    return chunks


def run_cli(args: argparse.Namespace) -> int:
    """Start the 2 ranks, then print the table rank 0 wrote."""
    import subprocess
    import tempfile

    from parallel.engine import free_port

    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    chunks = parse_chunks(args.chunks)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench_ep.json"
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                   str(free_port()), "--module", "launch.bench.ep", "--out", str(out),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--chunks", ",".join(map(str, chunks)) or "none"] + (["--line-up"] if args.line_up else [])
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            raise RuntimeError("the benchmark ranks failed:\n" + "\n".join(tail))
        report = json.loads(out.read_text())
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict) -> None:
    print(f"moe bench ep: {report['world_size']} ranks ({report['device']}, {report['threads']} threads each), "
          f"torch {report['torch']}, {report['tokens_per_rank']} tokens per rank per step, "
          f"{report['steps']} timed steps after {report['warmup']} warm-up")
    for line in __doc__.split("It reports")[1].split("All figures")[0].strip("\n").splitlines():
        print(line)
    print()
    names = ("step ms", "a2a ms", "not hidden", "wait ms", "a2a share", "MB sent", "formula MB", "|dloss|", "|dgrad|")
    print(f"{'config':<14}{'E':>4}{'k':>3}{'EP':>4}{'chunks':>7}  " + "".join(f"{c:>11}" for c in names))
    for row in report["results"]:
        cells = [f"{row['step_ms']:.1f}", f"{row['a2a_ms']:.1f}", f"{row['blocked_ms']:.1f}",
                 f"{row['wait_ms']:.1f}" if row.get("lined_up") else "-",
                 f"{100 * row['a2a_share']:.1f}%", f"{row['mb_sent']:.2f}", f"{row['formula_mb']:.2f}",
                 _diff(row.get("loss_diff")), _diff(row.get("grad_diff"))]
        print(f"{row['config']:<14}{row['num_experts']:>4}{row['top_k']:>3}{row['ep']:>4}{row.get('chunks', 1):>7}  "
              + "".join(f"{c:>11}" for c in cells))
    for name in CONFIGS:
        rows = {(r["ep"], r.get("chunks", 1)): r for r in report["results"] if r["config"] == name}
        if (1, 1) in rows and (2, 1) in rows:
            print(f"{name}: EP=2 step time / EP=1 step time = {rows[2, 1]['step_ms'] / rows[1, 1]['step_ms']:.2f}x; "
                  f"measured / formula bytes at EP=2 = {rows[2, 1]['mb_sent'] / rows[2, 1]['formula_mb']:.3f}")
        for (ep, chunks), row in sorted(rows.items()):
            if ep == 2 and chunks > 1 and (2, 1) in rows:
                serial = rows[2, 1]
                print(f"{name}: chunks={chunks} / serial at EP=2: step time {row['step_ms'] / serial['step_ms']:.2f}x, "
                      f"a2a not hidden {serial['blocked_ms']:.1f} -> {row['blocked_ms']:.1f} ms per step")


def _diff(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def _measure(name: str, overrides: list, ep: int, steps: int, warmup: int, rank: int, world: int,
             chunks: int = 1, line_up: bool = False) -> dict:
    from launch.config import load_run_config
    from moe import MoETransformer, collect_aux_losses, moe_layers, update_expert_biases
    from moe.devices import collective_device
    from parallel.engine import build_engine
    from parallel.expert_parallel import apply_expert_parallel, exchange_stats, line_up_exchanges
    from parallel.groups import expert_parallel_groups

    repo = Path(__file__).resolve().parents[2]
    cfg = load_run_config(repo / "configs" / "tiny.yaml",
                          [*overrides, "train.grad_clip=1.0", f"model.moe.a2a_overlap_chunks={chunks}"])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    lined_up = line_up and ep > 1 and chunks == 1
    if ep > 1:
        apply_expert_parallel(model, expert_parallel_groups(ep))
        line_up_exchanges(model, lined_up)
    engine = build_engine(model, cfg.deepspeed, cfg.train)
    t = cfg.train
    generator = torch.Generator().manual_seed(1000 + rank)
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            exchange_stats(model)  # count the timed steps only
        batch = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=generator)
        batch = batch.to(engine.device)
        dist.barrier()
        start = time.perf_counter()
        _, loss = engine(batch[:, :-1], labels=batch[:, 1:])
        aux = collect_aux_losses(model)
        engine.backward(loss if aux is None else loss + aux)
        engine.step()
        update_expert_biases(model, group=dist.group.WORLD)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=collective_device())
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
        if step >= warmup:
            times.append(float(elapsed))
    counted = exchange_stats(model)
    stats = torch.tensor([counted["seconds"], counted["bytes_sent"], counted["blocked_seconds"],
                          counted["wait_seconds"]], dtype=torch.float64, device=collective_device())
    dist.all_reduce(stats)
    moe = cfg.model.moe
    num_moe_layers = len(list(moe_layers(model)))
    tokens = t.micro_batch_size * t.seq_len
    step_s = statistics.median(times)
    a2a_s = float(stats[0]) / world / steps
    return {
        "config": name, "num_experts": moe.num_experts, "top_k": moe.top_k, "ep": ep, "chunks": chunks,
        "hidden": moe.hidden_size, "moe_layers": num_moe_layers, "step_ms": 1e3 * step_s, "a2a_ms": 1e3 * a2a_s,
        "blocked_ms": 1e3 * float(stats[2]) / world / steps, "a2a_share": a2a_s / step_s,
        "wait_ms": 1e3 * float(stats[3]) / world / steps, "lined_up": lined_up,
        "mb_sent": float(stats[1]) / world / steps / 1e6,
        "formula_mb": all_to_all_bytes_per_step(num_moe_layers, tokens, moe.top_k, moe.hidden_size, 4, ep) / 1e6,
    }


def _differences(overrides: list, chunks: list, rank: int) -> dict:
    """{n: (|dloss|, |dgrad|)}: one forward and backward at EP=2 with ``a2a_overlap_chunks`` n against
    1, same weights and batch (the tokens differ per rank); max over the ranks."""
    from launch.config import load_run_config
    from moe import MoETransformer, collect_aux_losses
    from moe.devices import collective_device, default_device
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.groups import expert_parallel_groups

    repo = Path(__file__).resolve().parents[2]
    device = default_device()
    runs = {}
    for n in (1, *chunks):
        cfg = load_run_config(repo / "configs" / "tiny.yaml", [*overrides, f"model.moe.a2a_overlap_chunks={n}"])
        torch.manual_seed(0)
        model = apply_expert_parallel(MoETransformer(cfg.model), expert_parallel_groups(2)).to(device).train()
        t = cfg.train
        generator = torch.Generator().manual_seed(2000 + rank)
        batch = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=generator)
        batch = batch.to(device)
        _, loss = model(batch[:, :-1], labels=batch[:, 1:])
        aux = collect_aux_losses(model)
        total = loss if aux is None else loss + aux
        total.backward()
        runs[n] = (total.detach(), [p.grad for p in model.parameters() if p.grad is not None])
    serial_loss, serial_grads = runs[1]
    found = {}
    for n in chunks:
        loss, grads = runs[n]
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads, serial_grads)) if grads else 0.0
        if len(grads) != len(serial_grads):
            grad_diff = float("inf")
        both = torch.tensor([float((loss - serial_loss).abs()), grad_diff], dtype=torch.float64,
                            device=collective_device())
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        found[n] = both.tolist()
    return found


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="launch.bench.ep")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunks", default=DEFAULT_CHUNKS)
    parser.add_argument("--line-up", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from parallel.engine import init_distributed

    rank, world = init_distributed()
    if world != 2:
        raise SystemExit(f"moe bench ep runs on exactly 2 ranks, got {world}")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    chunks = parse_chunks(args.chunks)
    results = []
    for name, overrides in CONFIGS.items():
        results += [_measure(name, overrides, ep, args.steps, args.warmup, rank, world, line_up=args.line_up)
                    for ep in (1, 2)]
        differences = _differences(overrides, chunks, rank) if chunks else {}
        for n in chunks:
            row = _measure(name, overrides, 2, args.steps, args.warmup, rank, world, chunks=n)
            row["loss_diff"], row["grad_diff"] = differences[n]
            results.append(row)
    if rank == 0:
        from launch.config import load_run_config

        cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
        report = {"world_size": world, "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
                  "warmup": args.warmup, "tokens_per_rank": cfg.train.micro_batch_size * cfg.train.seq_len,
                  "results": results}
        Path(args.out).write_text(json.dumps(report, indent=2))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
