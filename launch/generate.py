"""``moe generate --model PATH --prompt TEXT [--experts K] [--max-new-tokens N] ...``: text from an
exported model (or a training checkpoint), at any number of active experts.

Tokens are bytes: the prompt is UTF-8 encoded, the output decoded with invalid bytes replaced.
"""

from __future__ import annotations

import argparse
import time

import torch

from launch.evaluate import add_device_argument
from moe.errors import UserError


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate text at a chosen number of active experts")
    parser.add_argument("--model", required=True, help="an exported model folder or a training checkpoint folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--experts", default=None, metavar="K|auto",
                        help="active experts per MoE layer (default: as saved with the model); auto: the largest "
                             "k within --budget-ms-per-token or --budget-flops, from the sweep `moe slim` saved")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms-per-token", type=float, default=None, help="decode time budget for --experts auto")
    budget.add_argument("--budget-flops", type=float, default=None, help="FLOPs per token budget for --experts auto")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launch.evaluate import load_model_for_eval
    from moe.devices import describe_device

    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise UserError("--prompt is empty: give at least one character to continue")
    model, _ = load_model_for_eval(args.model, args.device)
    device = next(model.parameters()).device
    experts = _resolve_experts(args)
    if model.config.vocab_size < 256:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is not byte-level (256)")
    budget = model.config.max_seq_len - len(prompt)
    if budget < 1:
        raise UserError(f"the prompt is {len(prompt)} bytes; the model reads at most {model.config.max_seq_len}")
    new_tokens = min(args.max_new_tokens, budget)
    input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    start = time.perf_counter()
    output = model.generate(input_ids, new_tokens, active_experts=experts, temperature=args.temperature,
                            top_k=args.top_k, generator=torch.Generator(device=device).manual_seed(args.seed))
    output = output.cpu()  # waits for the device
    elapsed = time.perf_counter() - start
    text = bytes(output[0, len(prompt):].tolist()).decode("utf-8", errors="replace")
    ks = [block.ffn.active_experts for block in model.blocks if hasattr(block.ffn, "active_experts")]
    k = experts if experts is not None else (ks[0] if len(set(ks)) == 1 else ks)
    print(args.prompt + text)
    print(f"-- {new_tokens} bytes at k={k} of {model.config.moe.num_experts} experts, "
          f"{new_tokens / max(elapsed, 1e-9):,.0f} bytes/s (static KV cache{', CUDA graphs' if device.type == 'cuda' else ''}; "
          f"the first call captures the graphs) on {describe_device(device)}")
    return 0


def _resolve_experts(args: argparse.Namespace):
    from launch.slim import load_sweep, pick_k

    if args.experts is None:
        return None
    if args.experts == "auto":
        if args.budget_ms_per_token is None and args.budget_flops is None:
            raise UserError("--experts auto needs --budget-ms-per-token or --budget-flops")
        return pick_k(load_sweep(args.model), args.budget_ms_per_token, args.budget_flops)
    try:
        return int(args.experts)
    except ValueError:
        raise UserError(f"--experts {args.experts!r} is invalid: expected an integer k or 'auto'") from None
