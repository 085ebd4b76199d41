"""``moe config CONFIG [--set k=v ...]``: validate a run config and print what it builds.

Prints the resolved config as YAML and the model's parameter counts: in total, and active per
token at each k the run will use (k_min and k_max of the schedule, or top_k). Nothing is trained.
"""

from __future__ import annotations

import argparse

import yaml

from launch.config import load_run_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("config", help="validate a run config and print its model's parameter counts")
    parser.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="print only the parameter counts")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe import MoETransformer

    cfg = load_run_config(args.config, args.overrides)
    if not args.quiet:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None).rstrip())
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = MoETransformer(cfg.model)
    moe_cfg = cfg.model.moe
    ks = sorted({moe_cfg.top_k} if moe_cfg.k_schedule == "constant" else {moe_cfg.k_min, moe_cfg.k_max})
    print(f"parameters: {model.num_parameters():,} total")
    for k in ks:
        print(f"parameters: {model.num_parameters(active_k=k):,} active per token at k={k}")
    return 0
