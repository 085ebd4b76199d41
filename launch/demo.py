"""``moe demo``: one MoE layer, trained for a few hundred steps on one process, with routing
statistics printed as it goes.

The layer learns to imitate a fixed random dense MLP (the "teacher") on a skewed token stream: the
tokens come from a few clusters of very unequal weight, so an unbalanced router sends most of them
to a few experts. By default it is SMoE-Dropout with bias balancing: a fixed random router, k
growing linearly from 1 to E, and the per-expert bias moved after every optimizer step. The run
prints MaxVio falling, the per-expert load at the end, and the teacher-matching loss of the same
weights evaluated at every k from 1 to E (self-slimming).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import moe
from moe import LoadMeter, MoEConfig, MoELayer


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="train one MoE layer on a synthetic skewed stream and print routing statistics")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--ffn-hidden-size", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--router", choices=("random", "learned"), default="random")
    parser.add_argument("--balance", choices=("bias", "aux_loss", "none"), default="bias")
    parser.add_argument("--k-min", type=int, default=1)
    parser.add_argument("--k-max", type=int, default=None, help="default: number of experts")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bias-update-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


class SkewedStream:
    """Tokens drawn from C Gaussian clusters with Zipf-like weights (cluster c has weight 1/(c+1)^2)."""

    def __init__(self, hidden: int, clusters: int = 6, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.centres = 2.0 * torch.randn(clusters, hidden, generator=self.generator)
        weights = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float32) ** 2
        self.probs = weights / weights.sum()

    def sample(self, num_tokens: int) -> torch.Tensor:
        cluster = torch.multinomial(self.probs, num_tokens, replacement=True, generator=self.generator)
        return self.centres[cluster] + torch.randn(num_tokens, self.centres.shape[1], generator=self.generator)


def _teacher(hidden: int, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    w_in = torch.randn(hidden, 4 * hidden, generator=generator) / hidden**0.5
    w_out = torch.randn(4 * hidden, hidden, generator=generator) / (4 * hidden) ** 0.5
    return lambda x: F.gelu(x @ w_in) @ w_out


def _evaluate(layer: MoELayer, teacher, tokens: torch.Tensor) -> tuple[float, dict]:
    layer.eval()
    meter = LoadMeter(layer)
    with torch.no_grad():
        loss = F.mse_loss(layer(tokens), teacher(tokens)).item()
    meter.update()
    layer.train()
    return loss, meter.summary()


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    k_max = args.k_max if args.k_max is not None else args.experts
    config = MoEConfig(
        hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size, num_experts=args.experts,
        top_k=args.k_min, router=args.router, balance=args.balance, bias_update_rate=args.bias_update_rate,
        k_schedule="linear", k_min=args.k_min, k_max=k_max, k_schedule_steps=max(1, args.steps - 1),
    )
    layer = MoELayer(config)
    teacher = _teacher(args.hidden_size, args.seed)
    stream = SkewedStream(args.hidden_size, seed=args.seed)
    held_out = stream.sample(4096)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=args.lr)

    print(f"moe demo: {layer}")
    print(f"  router={config.router} balance={config.balance} k: {config.k_min} -> {config.k_max} over {args.steps} steps, "
          f"{args.tokens} tokens/step, skewed stream of {len(stream.probs)} clusters")
    start_loss, start = _evaluate(layer, teacher, held_out)
    print(f"  before training: held-out MSE {start_loss:.4f}, MaxVio {start['max_vio_global_mean']:.3f} at k={layer.active_experts}")
    tic = time.perf_counter()
    progress = tqdm(range(args.steps), desc="demo", unit="step", dynamic_ncols=True)
    for step in progress:
        k = moe.advance_k_schedule(layer, step)[0]
        x = stream.sample(args.tokens)
        loss = F.mse_loss(layer(x), teacher(x))
        aux = moe.collect_aux_losses(layer)
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe.update_expert_biases(layer)
        max_vio = moe.max_violation(layer.last_routing.routed_per_expert)
        progress.set_postfix(loss=f"{loss.item():.4f}", k=k, max_vio=f"{max_vio:.2f}")
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            tqdm.write(f"  step {step:4d}  k={k}  loss {loss.item():.4f}  MaxVio(batch) {max_vio:.3f}")
    elapsed = time.perf_counter() - tic
    progress.close()

    end_loss, end = _evaluate(layer, teacher, held_out)
    print(f"  trained {args.steps} steps in {elapsed:.1f} s ({args.steps * args.tokens / elapsed:,.0f} tokens/s)")
    print(f"  held-out MSE at k={layer.active_experts}: {start_loss:.4f} -> {end_loss:.4f}")
    if layer.router.expert_bias is not None:
        print("  expert bias: " + " ".join(f"{b:+.3f}" for b in layer.router.expert_bias.tolist()))
    per_expert = sum(w[0].numel() for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3) if w is not None)
    print("  self-slimming, same weights at every k (held-out set):")
    print("      k   MSE      MaxVio   load share per expert                  expert params/token")
    for k in range(1, config.num_experts + 1):
        moe.set_active_experts(layer, k)
        mse, stats = _evaluate(layer, teacher, held_out)
        load = stats["tokens_per_expert"]["moe"].double()
        share = " ".join(f"{s:.2f}" for s in (load / load.sum()).tolist())
        print(f"    {k:3d}   {mse:.4f}   {stats['max_vio_global_mean']:6.3f}   {share:38s} {k * per_expert:,}")
    return 0
