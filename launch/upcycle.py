"""``moe upcycle --dense PATH --out PATH --experts E``: a trained dense model as the start of an MoE.

PATH is an exported dense model (or a training checkpoint folder) of this framework: every FFN a
dense SwiGLU (``configs/tiny_dense.yaml`` trains one). OUT gets an export of the MoE model whose
experts start as copies of each FFN (``--granularity G``: slices of it), with the routers of a new
model (``--router random``: SMoE-Dropout's fixed gate; ``learned``), k = ``--top-k`` (default G),
and ``--noise S`` times each weight's standard deviation added to every expert (0 keeps the dense
function exactly; see :mod:`moe.upcycle`). It records the dense model's training data, so

    moe train --config configs/tiny.yaml --init OUT --set out_dir=runs/upcycled

continues from it (the model section comes from OUT; ``--set model.moe...`` changes the routing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe.errors import UserError


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("upcycle", help="turn a trained dense model into an MoE whose experts start from its FFNs")
    parser.add_argument("--dense", required=True, help="an exported dense model (or a training checkpoint folder)")
    parser.add_argument("--out", required=True, help="folder to write the MoE export to")
    parser.add_argument("--experts", type=int, required=True, help="experts E per MoE layer")
    parser.add_argument("--granularity", type=int, default=1,
                        help="each expert a 1/G slice of the FFN (default 1: whole copies)")
    parser.add_argument("--top-k", type=int, default=None, help="active experts k (default: the granularity)")
    parser.add_argument("--router", choices=("random", "learned"), default="random",
                        help="random: SMoE-Dropout's fixed gate (default); learned: a trainable gate")
    parser.add_argument("--balance", choices=("none", "aux_loss", "bias"), default=None,
                        help="load balancing of the MoE (default: the dense model's setting)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="Gaussian noise, in units of each weight's std, added to every expert (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of a new model's routers")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from launch.evaluate import load_model_for_eval
    from launch.export import check_output_apart, real_path
    from moe import save_pretrained
    from moe.pretrained import CONFIG_NAME, WEIGHTS_NAME
    from moe.upcycle import upcycle

    out = Path(args.out).expanduser()
    check_output_apart(out, args.dense, "--out", "--dense")
    if not args.overwrite and ((out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists()):
        raise UserError(f"{str(out)!r} already holds an exported model; pass --overwrite to replace it")
    dense, trained_on = load_model_for_eval(args.dense, "cpu")
    changes = {} if args.balance is None else {"balance": args.balance}
    torch.manual_seed(args.seed)  # a learned router's initial weights
    model = upcycle(dense.float(), args.experts, args.granularity, args.router, args.top_k, args.noise, args.seed,
                    router_seed=args.seed, **changes)
    source = {"upcycled_from": str(real_path(args.dense)), "experts": args.experts, "granularity": args.granularity,
              "noise": args.noise}
    save_pretrained(model, out, metadata={"data": trained_on, "source": source})
    moe_cfg = model.config.moe
    print(f"upcycled {args.dense} -> {out}: {model.config.num_layers} MoE layers of {moe_cfg.num_experts} experts "
          f"(width {moe_cfg.ffn_hidden_size}, k={moe_cfg.top_k}, router {moe_cfg.router}); "
          f"{dense.num_parameters():,} -> {model.num_parameters():,} parameters, "
          f"{model.num_parameters(active_k=moe_cfg.top_k):,} active per token")
    return 0
