"""``moe bench quant --model PATH``: calibration wall time with 1, 2, ... Ray workers.

For each worker count W, an embedded local Ray with W CPUs is started (its start-up is not timed),
and the same quantization (by default GPTQ + EBSS + AGQ, 4 bits) runs from scratch: EBSS
generation, Hessian capture per shard, one solve per linear. The shards are fixed (``--shards``),
so every run does the same work and produces the same model; only the number of workers that
share it changes. Printed: wall seconds, Ray tasks, and the speedup over one worker, all measured
in this run. SIGTERM or SIGINT stop it cleanly (Ray shut down, the temporary outputs removed) with
exit status 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from moe.errors import UserError


def add_parser(which: argparse._SubParsersAction) -> None:
    parser = which.add_parser("quant", help="quantization calibration wall time with 1 and 2 Ray workers")
    parser.add_argument("--model", required=True, help="an exported model folder")
    parser.add_argument("--workers", default="1,2", help="worker counts to time (default 1,2)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--method", choices=("gptq",), default="gptq")
    parser.add_argument("--calib", choices=("random", "ebss"), default="ebss")
    parser.add_argument("--no-agq", action="store_true", help="plain GPTQ Hessians (default: AGQ)")
    parser.add_argument("--experts", type=int, default=None, help="active experts while calibrating")
    parser.add_argument("--num-sequences", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from launch.quantize.cluster import Stopped, ray_session
    from launch.quantize.job import QuantizeOptions, quantize_model

    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or min(workers) < 1:
        raise UserError(f"--workers {args.workers!r} is invalid: expected a list of positive integers, e.g. 1,2")
    options = QuantizeOptions(method=args.method, bits=args.bits, calib=args.calib, agq=not args.no_agq,
                              experts=args.experts, num_sequences=args.num_sequences, seq_len=args.seq_len,
                              shards=args.shards)
    rows = []
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in workers:
            out = Path(tmp) / f"workers-{count}"
            try:
                with ray_session(None, num_cpus=count):
                    result = quantize_model(args.model, str(out), options, progress=False)
            except Stopped as stop:
                print(f"moe bench quant: stopped by {stop.name}", file=sys.stderr, flush=True)
                return 128 + stop.signum
            outputs.append(out)
            rows.append({"workers": count, "wall_s": result.wall_s, "ray_tasks": result.ray_tasks})
        base = rows[0]["wall_s"] if rows[0]["workers"] == 1 else None
        for row in rows:
            row["speedup_vs_1"] = None if base is None else base / row["wall_s"]
        from safetensors.torch import load_file

        first = load_file(str(outputs[0] / "model.safetensors"))
        same = all(
            all(torch.equal(first[name], tensor) for name, tensor in load_file(str(path / "model.safetensors")).items())
            for path in outputs[1:]
        )
    print(f"quantization calibration: {options.label} W{options.bits}, calib {options.calib}, "
          f"{options.shards} shards, model {args.model}")
    print("| Ray workers | wall s | Ray tasks | speedup vs 1 worker |")
    print("|---|---|---|---|")
    for row in rows:
        speedup = "-" if row["speedup_vs_1"] is None else f"{row['speedup_vs_1']:.2f}x"
        print(f"| {row['workers']} | {row['wall_s']:.1f} | {row['ray_tasks']} | {speedup} |")
    print(f"identical quantized weights across worker counts: {'yes' if same else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": asdict(options), "rows": rows, "identical": same}, indent=2))
    return 0 if same else 1
