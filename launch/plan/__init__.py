"""``moe plan``: estimate memory and speed of every parallel layout before renting the GPUs.

    moe plan --config configs/gpu_example.yaml --cluster configs/clusters/h100_8x16.yaml [--nodes N]
             [--gpus G] [--seq-len S] [--global-batch TOKENS] [--top 5] [--json FILE] [--set k=v]
    moe plan --validate [--bench-json PATH] [--calibrate-cpu]
                                                predictions beside `moe bench ep` and the H100 runbook
    moe plan --calibrate-cpu [--ranks 2]        measure this machine for configs/clusters/cpu2.yaml

For each layout (data parallel over all W devices; EP of them sharing each layer's experts; ZeRO
stage 0-3; a micro-batch, with gradient accumulation making up the global batch) it estimates the
memory per device and the step time split into compute, all-to-all and gradient reduction
(:mod:`launch.plan.model` documents every formula), prints the fastest ones that fit and, grouped by
reason, the ones that do not. The simulation-based search is Pangu Ultra MoE's idea (see
research/papers.md); the model is this project's: simple, documented, checked by ``--validate``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from moe.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("plan", help="estimate memory and tokens/s of each parallel layout on a cluster",
                                 description="Estimate memory per device, step time (compute, all-to-all, gradient "
                                 "reduction) and tokens/s of each parallel layout of a run config on a cluster; "
                                 "launch/plan/model.py documents every formula.")
    parser.add_argument("--config", help="YAML run config, e.g. configs/gpu_example.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--cluster", help="cluster description, e.g. configs/clusters/h100_8x16.yaml")
    parser.add_argument("--nodes", type=int, help="nodes (default: the cluster file's)")
    parser.add_argument("--gpus", type=int, help="devices per node (default: the cluster file's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: train.seq_len)")
    parser.add_argument("--global-batch", type=int, metavar="TOKENS",
                        help="tokens per optimizer step (default: micro_batch_size x grad_accum x seq_len x devices)")
    parser.add_argument("--micro-batches", type=_int_list, default=[1, 2, 4, 8, 16, 32], metavar="LIST",
                        help="micro-batch sizes to try (default 1,2,4,8,16,32; the config's is added)")
    parser.add_argument("--zero", type=_int_list, default=[0, 1, 2, 3], metavar="LIST", help="ZeRO stages (default 0,1,2,3)")
    parser.add_argument("--k", type=int, help="active experts (default: the k schedule's value at --step)")
    parser.add_argument("--step", type=int, help="optimizer step whose k is used (default: the middle of train.steps)")
    parser.add_argument("--top", type=int, default=5, help="layouts to list (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write every estimate as JSON")
    parser.add_argument("--validate", action="store_true",
                        help="print predictions beside `moe bench ep` (2 CPU ranks) and the H100 runbook's figures")
    parser.add_argument("--bench-json", metavar="PATH", help="with --validate: a `moe bench ep --json` report instead of a new run")
    parser.add_argument("--calibrate-cpu", action="store_true", help="measure this machine's figures for a CPU cluster file (with --validate: "
                        "use them instead of configs/clusters/cpu2.yaml)")
    parser.add_argument("--ranks", type=int, default=2, help="with --calibrate-cpu: gloo ranks (default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.validate:
        from launch.plan.validate import validate

        return 1 if validate(args.bench_json, calibrate=args.calibrate_cpu) else 0
    if args.calibrate_cpu:
        from launch.plan.calibrate import as_yaml, calibrate_cpu

        if args.ranks < 2:
            raise UserError(f"--ranks must be >= 2 (the collectives need two ranks), got {args.ranks}")
        print(as_yaml(calibrate_cpu(args.ranks), args.ranks))
        return 0
    if not args.config or not args.cluster:
        raise UserError("moe plan needs --config and --cluster (or --validate, or --calibrate-cpu)")
    return plan(args)


def _check_positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")


def plan(args: argparse.Namespace) -> int:
    from launch.config import load_run_config
    from launch.plan.cluster import load_cluster
    from launch.plan.model import model_facts, rank, search

    for name in ("nodes", "gpus", "seq_len", "global_batch", "top", "k", "step"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if 0 in args.micro_batches:
        raise UserError("--micro-batches: every size must be >= 1")
    if any(z not in (0, 1, 2, 3) for z in args.zero):
        raise UserError(f"--zero: expected stages among 0, 1, 2, 3, got {args.zero}")
    cfg = load_run_config(args.config, args.overrides)
    if args.seq_len and args.seq_len > cfg.model.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    cluster = load_cluster(args.cluster).resized(args.nodes, args.gpus)
    facts = model_facts(cfg, k=args.k, step=args.step, seq_len=args.seq_len)
    t = cfg.train
    world = cluster.world_size
    global_batch = args.global_batch or t.micro_batch_size * t.grad_accum * facts.seq_len * world
    zero_section = cfg.deepspeed.get("zero_optimization", {})
    results = search(facts, cluster, global_batch, [*args.micro_batches, t.micro_batch_size], args.zero,
                     zero_section if isinstance(zero_section, dict) else {})
    best = rank(results)

    _print_header(args, cfg, cluster, facts, global_batch, len(results), len(best))
    _print_best(best, args.top, cluster)
    _print_rejected(results, world * facts.seq_len)
    if args.json:
        payload = {"config": args.config, "cluster": args.cluster, "world": world, "global_batch_tokens": global_batch,
                   "facts": {**facts.__dict__, "layer_ks": list(facts.layer_ks), "layer_experts": list(facts.layer_experts)},
                   "feasible": [r.to_dict() for r in best], "rejected": [r.to_dict() for r in results if r.reason]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def _print_header(args, cfg, cluster, facts, global_batch: int, layouts: int, feasible: int) -> None:
    precision = "bf16" if cluster.bf16 else "fp32"
    experts = "/".join(map(str, sorted(set(facts.layer_experts))))
    ks = "/".join(map(str, sorted(set(facts.layer_ks))))
    step = args.step if args.step is not None else cfg.train.steps // 2
    k_note = f"--k {args.k}" if args.k else f"the k schedule at step {step}"
    print(f"moe plan: {args.config} on {args.cluster}: {cluster.nodes} node(s) x {cluster.gpus_per_node} = "
          f"{cluster.world_size} devices ({cluster.name or 'unnamed'}), {precision}")
    print(f"model: {facts.params:,} parameters ({facts.expert_params:,} in experts), {cfg.model.num_layers} layers, "
          f"{facts.moe_layers} MoE of {experts} experts, k={ks} ({k_note})")
    print(f"per token: {facts.train_flops_per_token / 1e9:.3g} GFLOP to train at seq {facts.seq_len}; "
          f"{facts.ops_per_micro_batch:,} ops per micro-batch and {facts.ops_per_step:,} per optimizer step (counted)")
    print(f"global batch: {global_batch:,} tokens per step; {layouts} layouts, {feasible} feasible")
    print()


def _print_best(best: list, top: int, cluster) -> None:
    from launch.plan.model import GIB

    if not best:
        print("no layout fits: see the reasons below")
        return
    print(f"best {min(top, len(best))}:")
    print(f"  {'#':>2} {'DP':>5} {'EP':>4} {'ZeRO':>5} {'mb':>4} {'accum':>6} {'GiB/dev':>8} {'compute ms':>11} "
          f"{'a2a ms':>8} {'reduce ms':>10} {'step ms':>9} {'tokens/s':>11} {'MFU':>6}")
    for i, r in enumerate(best[:top], 1):
        lay = r.layout
        mfu = r.model_flops_per_s / cluster.peak_flops
        print(f"  {i:>2} {lay.dp:>5} {lay.ep:>4} {lay.zero:>5} {lay.micro_batch:>4} {lay.grad_accum:>6} "
              f"{r.memory_bytes / GIB:>8.1f} {1e3 * r.compute_s:>11.1f} {1e3 * r.a2a_s:>8.1f} "
              f"{1e3 * r.allreduce_s:>10.1f} {1e3 * r.step_s:>9.1f} {r.tokens_per_s:>11,.0f} {100 * mfu:>5.1f}%")
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in best[0].memory.items())
    print(f"  #1 memory GiB: {parts}; compute: {best[0].detail}")


def _print_rejected(results: list, tokens_per_micro_batch_size: int) -> None:
    """The rejected layouts grouped by reason: the nearest to fitting, or the fastest, of each."""
    from launch.plan.model import GIB, SUPPORTED_ZERO_STAGES

    rejected = defaultdict(list)
    for r in results:
        if r.reason is not None:
            rejected[r.reason].append(r)
    if not rejected:
        return
    print()
    print("rejected:")
    for reason, group in rejected.items():
        print(f"  {reason}: {len(group)} layout(s)")
        if reason.startswith("EP does not divide"):
            print(f"    EP = {', '.join(str(ep) for ep in sorted({r.layout.ep for r in group}))}")
            continue
        if reason.startswith("global batch"):
            sizes = sorted({r.layout.micro_batch for r in group})
            print("    " + ", ".join(f"mb={mb} ({mb * tokens_per_micro_batch_size:,} tokens)" for mb in sizes))
            continue
        oom = reason == "out of memory"
        group.sort(key=lambda r: (r.layout.zero not in SUPPORTED_ZERO_STAGES, r.memory_bytes) if oom else -r.tokens_per_s)
        for r in group[:3]:
            extra = r.detail if oom else f"{r.memory_bytes / GIB:.1f} GiB, {r.tokens_per_s:,.0f} tokens/s if it ran"
            print(f"    EP={r.layout.ep} ZeRO-{r.layout.zero} mb={r.layout.micro_batch}: {extra}")
        if len(group) > 3:
            print(f"    ... and {len(group) - 3} more")
