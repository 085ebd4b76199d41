"""One rank of the expert-parallel layer check; run by tests/parallel/test_expert_parallel.py as

    deepspeed --num_gpus 2 tests/parallel/ep_worker.py --out DIR

Every rank builds the same MoE layer from one seed. The reference is that layer, unsliced, run
separately on each rank's tokens (so capacity, which is counted over a rank's own tokens, drops
the same assignments): the expected output of rank r is ref(x_r); the expected gradient of an
expert weight is the sum over ranks of d loss_r / d w, sliced to this rank's experts; the expected
gradients of the router and of the input are rank r's own. The expert-parallel copy then runs on
x_r only, with the all-to-all dispatcher. Each case writes the largest differences to
DIR/<case>.rank<r>.json for the test to check.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe import MoEConfig, MoELayer  # noqa: E402
from parallel.engine import init_distributed  # noqa: E402
from parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from parallel.groups import expert_parallel_groups  # noqa: E402

CASES = {
    # learned router, softmax, top-2, dropless
    "learned_top2": dict(router="learned", top_k=2),
    # the fixed random router with bias balancing, k = 3 of 8, GELU experts
    "random_bias_top3": dict(router="random", balance="bias", top_k=3, activation="gelu"),
    # every token chooses experts of rank 0: rank 1 receives nothing, experts 4..7 get zero rows
    "skewed_to_rank0": dict(router="learned", balance="bias", top_k=2, skew=True),
    # capacity with drops (per rank, as DeepSpeed and Megatron count it)
    "capacity_probs": dict(router="learned", top_k=2, capacity_factor=0.5, drop_policy="probs"),
    # a shared expert beside the routed ones: computed on each rank's own tokens, never dispatched
    "shared_top2": dict(router="learned", top_k=2, num_shared_experts=1, shared_ffn_hidden_size=6),
}


def tokens_of(rank: int, num_tokens: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(num_tokens + rank, hidden, generator=gen), torch.randn(num_tokens + rank, hidden, generator=gen)


def run_case(name: str, options: dict, out_dir: Path, rank: int, world: int) -> None:
    options = dict(options)
    skew = options.pop("skew", False)
    config = MoEConfig(hidden_size=12, ffn_hidden_size=10, num_experts=8, **options)
    torch.manual_seed(0)
    layer = MoELayer(config, layer_idx=3)
    if skew:
        with torch.no_grad():
            layer.router.expert_bias[:4] = 100.0  # bias steers selection only: the weights stay unbiased
    layer.train()
    reference = copy.deepcopy(layer)

    # reference: the whole layer on each rank's tokens
    expert_grads = {w: 0 for w in ("w1", "w3", "w2") if getattr(reference.experts, w) is not None}
    for r in range(world):
        x, g = tokens_of(r, 37, config.hidden_size)
        x.requires_grad_(True)
        reference.zero_grad()
        y = reference(x)
        (y * g).sum().backward()
        for w in expert_grads:
            expert_grads[w] = expert_grads[w] + getattr(reference.experts, w).grad.clone()
        if r == rank:
            expected_y, expected_x_grad = y.detach(), x.grad.clone()
            expected_router = None if reference.router.weight.grad is None else reference.router.weight.grad.clone()
            expected_counts = reference.last_routing.tokens_per_expert.clone()
            expected_shared = None if reference.shared_mlp is None else reference.shared_mlp.w1.weight.grad.clone()

    groups = expert_parallel_groups(world)
    apply_expert_parallel(layer, groups)
    first, last = layer.expert_range
    x, g = tokens_of(rank, 37, config.hidden_size)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()

    def diff(a, b):
        return float((a - b).abs().max()) if a.numel() else 0.0

    result = {
        "output": diff(y.detach(), expected_y),
        "output_scale": float(expected_y.abs().max()),
        "input_grad": diff(x.grad, expected_x_grad),
        "router_grad": None if expected_router is None else diff(layer.router.weight.grad, expected_router),
        "expert_grads": {w: diff(getattr(layer.experts, w).grad, expert_grads[w][first:last]) for w in expert_grads},
        "expert_grad_scale": max(float(expert_grads[w].abs().max()) for w in expert_grads),
        "same_routing": bool(torch.equal(layer.last_routing.tokens_per_expert, expected_counts)),
        "rows_received": int(layer.dispatcher.stats.rows_received),
        "local_expert_rows": layer.experts.w1.grad.abs().sum(dim=(1, 2)).gt(0).tolist(),
        "dropped": layer.last_routing.num_dropped,
        "experts": [first, last],
        "shared_grad": None if layer.shared_mlp is None else diff(layer.shared_mlp.w1.weight.grad, expected_shared),
        "shared_marked_expert": None if layer.shared_mlp is None else any(
            getattr(p, "allreduce", True) is False for p in layer.shared_mlp.parameters()),
    }
    (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world = init_distributed()
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    for name, options in CASES.items():
        run_case(name, options, out_dir, rank, world)
    check_replicas(out_dir, rank, world)


def check_replicas(out_dir: Path, rank: int, world: int) -> None:
    """The checkpoint guard: replicated tensors must agree across ranks; expert slices may not."""
    from parallel.checkpoint import verify_replicas

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=12, ffn_hidden_size=10, num_experts=8, balance="bias"))
    apply_expert_parallel(layer, expert_parallel_groups(world))
    verify_replicas(layer)  # expert slices differ by construction: not an error
    with torch.no_grad():
        layer.router.expert_bias[0] += float(rank)  # rank 1's bias drifts
    try:
        verify_replicas(layer)
        message = None
    except RuntimeError as err:
        message = str(err)
    (out_dir / f"replicas.rank{rank}.json").write_text(json.dumps({"error": message}))


if __name__ == "__main__":
    main()
