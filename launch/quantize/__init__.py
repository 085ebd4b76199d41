"""``moe quantize``: post-training quantization of an exported model, its calibration spread over Ray.

The package: :mod:`~launch.quantize.job` (one quantization, block by block, resumable),
:mod:`~launch.quantize.cluster` (Ray, its tasks, stopping on signals), :mod:`~launch.quantize.compare`
(``--compare``); this module is the command.

    moe quantize --model PATH --out OUT [--method {rtn,gptq}] [--bits 4] [--calib {random,ebss}]
                 [--agq] [--group-size G] [--asym] [--act-order] [--experts K[,K...]] [--eora RANK]
                 [--ray-address ADDR]
    moe quantize --compare --model PATH --out DIR [--bits 3,4] [--eora RANK]

The work (the algorithms are in :mod:`moe.quant`; this module only schedules them):

1. the calibration set: ``random`` windows of the model's training corpus (GPTQ's usual choice), or
   ``ebss`` sequences the model writes itself (MoEQuant's expert-balanced self-sampling), one Ray
   task per shard of sequences;
2. block by block, as GPTQ does, the inputs of block l coming from the blocks before it *already
   quantized*: one Ray task per shard captures the Hessians of stage 1 (attention and router),
   one task per linear solves it; then, with the quantized router in place, the routing is
   recorded again and stage 2 captures each expert's Hessians (under ``--agq`` every token
   weighted by its gate), one task per (expert, linear) solves them; one task per shard then runs
   the finished block to give the next block its inputs. With several ks (``--experts 2,4,8``)
   every capture and advance runs once per k, on inputs that went through the earlier blocks at
   that k, and each linear's Hessians are summed over the ks;
3. every finished block is written to ``OUT/.partial/``; a job started again with the same
   settings (after a crash, a Ctrl-C or a lost cluster) resumes after the last finished block;
4. with ``--eora RANK``, each linear but the router also gets EoRA's rank-r correction from the
   same Hessian (:mod:`moe.quant.eora`), stored beside its packed weight and folded in on loading;
5. the quantized export in OUT (packed weights, :mod:`moe.quant.storage`), loadable with
   ``moe.load_pretrained`` and every command that takes ``--model``. It records the source
   model's training data with absolute paths (:func:`launch.evaluate.resolve_recorded_paths`).

OUT is never the model folder, inside it, or a folder that holds it
(:func:`launch.export.check_output_apart`), with or without ``--overwrite``.

SIGTERM and SIGINT stop a quantization cleanly (:func:`stop_on_signals`): the work in flight is
abandoned, an embedded Ray is shut down, the finished blocks stay in ``OUT/.partial``, and ``moe
quantize`` says so in one line and exits with 128 + the signal's number (143, 130).

Ray: with no ``--ray-address`` an embedded local Ray is started (and stopped); inside a Ray job
(``ray job submit ... -- moe quantize ...``, where ``RAY_ADDRESS`` is set) the job's cluster is
used; with an address, that cluster is joined (an unreachable one fails within seconds). Tasks
are retried when their worker dies; results do not depend on the number of workers (the shards
are fixed by ``--shards``, not by the cluster).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from launch.quantize.cluster import Stopped
from launch.quantize.compare import compare, compare_table
from launch.quantize.job import PARTIAL_DIR, QuantizeOptions, parse_experts, quantize_model
from moe.errors import UserError

# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="GPTQ / RTN weight quantization with EBSS and AGQ, over Ray")
    parser.add_argument("--model", required=True, help="an exported model folder (moe export)")
    parser.add_argument("--out", required=True, help="folder for the quantized export (with --compare: the report)")
    parser.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    parser.add_argument("--bits", default="4", help="weight bits, 2..8 (with --compare: a list, e.g. 3,4)")
    parser.add_argument("--group-size", type=int, default=-1, help="input columns per scale (default -1: per row)")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    parser.add_argument("--calib", choices=("random", "ebss"), default="random", help="calibration set")
    parser.add_argument("--agq", action="store_true", help="affinity-guided GPTQ: tokens weighted by their gates")
    parser.add_argument("--experts", default=None, metavar="K[,K...]",
                        help="active experts k while calibrating (default: as saved); a list such as 2,4,8 "
                             "calibrates at each k and sums the Hessians (the first k is the export's default)")
    parser.add_argument("--eora", type=int, default=None, metavar="RANK",
                        help="EoRA: a rank-RANK low-rank correction of each quantized linear's error (not the "
                             "router's), from its calibration activations (default: none; with --compare: the rank "
                             "of the EoRA rows, default 16, 0 for none)")
    parser.add_argument("--num-sequences", type=int, default=None, help="calibration sequences (default: sized to the model)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence")
    parser.add_argument("--ebss-width", type=int, default=4, help="EBSS search width w (default 4)")
    parser.add_argument("--ebss-tau", type=float, default=1.2, help="EBSS balance weight tau (default 1.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=4, help="calibration shards, one Ray task each (default 4)")
    parser.add_argument("--data", default=None, help="corpus for random calibration and --compare's evaluation")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (HOST:PORT or ray://HOST:PORT; default: the job's cluster or a local one)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT's export or unfinished job")
    parser.add_argument("--compare", action="store_true",
                        help="quantize with RTN, GPTQ, GPTQ+EBSS, GPTQ+AGQ, GPTQ+EBSS+AGQ, GPTQ+EBSS+AGQ+EoRA and "
                             "tabulate val perplexity (at each --experts k)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="--compare: validation tokens (default: as recorded with the model, data.val_tokens; "
                             "the same windows as moe eval and moe slim)")
    parser.add_argument("--device", default="auto",
                        help="where the calibration passes run: cpu, cuda, or auto (default: the GPUs of the Ray "
                             "cluster when it has any; each task holds a quarter of one)")
    parser.set_defaults(func=run)


def parse_bits(text: str, allow_list: bool) -> list[int]:
    try:
        bits = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        bits = []
    if not bits or (len(bits) > 1 and not allow_list):
        raise UserError(f"--bits {text!r} is invalid: expected an integer in 2..8" + (" or a list like 3,4" if allow_list else ""))
    return bits


def stopped_message(stop: Stopped, out: str, compare_report: bool = False) -> str:
    """The one line ``moe quantize`` prints when a signal stopped it: what is kept, how to resume."""
    if compare_report:
        return (f"stopped by {stop.name}; finished variants, calibration sets and blocks are kept in {out}, "
                f"run the same command again to resume")
    partial = Path(out).expanduser() / PARTIAL_DIR
    if (partial / "job.json").is_file():
        return (f"stopped by {stop.name}; finished blocks are kept in {Path(out) / PARTIAL_DIR}, run the same "
                f"command again to resume")
    return f"stopped by {stop.name} before any block was finished; run the same command again to start over"


def run(args: argparse.Namespace) -> int:
    bits = parse_bits(args.bits, args.compare)
    experts = parse_experts(args.experts)
    eora = args.eora
    if eora is not None and eora < 0:
        raise UserError(f"--eora {eora} is invalid: expected a rank >= 1 (0: none)")
    options = QuantizeOptions(
        method=args.method, bits=bits[0], group_size=args.group_size, symmetric=not args.asym, act_order=args.act_order,
        calib=args.calib, agq=args.agq, num_sequences=args.num_sequences, seq_len=args.seq_len,
        ebss_width=args.ebss_width, ebss_tau=args.ebss_tau, experts=experts, seed=args.seed, shards=args.shards,
        eora=0 if args.compare else (eora or 0),
    )
    for b in bits:
        QuantizeOptions(**{**asdict(options), "bits": b})
    try:
        if args.compare:
            report = compare(args.model, args.out, bits, options, args.ray_address, args.ray_cpus, args.data,
                             args.eval_tokens, device=args.device, eora_rank=eora)
        else:
            result = quantize_model(args.model, args.out, options, args.ray_address, args.ray_cpus, args.data,
                                    args.overwrite, device=args.device)
    except Stopped as stop:
        print(f"moe quantize: {stopped_message(stop, args.out, args.compare)}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    if args.compare:
        print(compare_table(report), end="")
        print(f"wrote {Path(args.out) / 'compare.md'}, compare.csv, compare.json")
        return 0
    sigma = "" if result.calibration_sigma is None else f", calibration sigma {result.calibration_sigma:.4f}"
    resumed = f", {result.resumed_blocks} blocks resumed from an earlier run" if result.resumed_blocks else ""
    ks = options.ks
    at = f" at k={','.join(str(k) for k in ks)}" if ks and len(ks) > 1 and options.method != "rtn" else ""
    print(f"quantized {args.model} -> {result.out}: {result.label} W{options.bits}{at} in {result.wall_s:.1f} s, "
          f"{result.ray_tasks} Ray tasks on {result.device}{sigma}{resumed}, {result.size_bytes / 1e6:.2f} MB")
    return 0
