"""The bias update sums token counts over every rank that routes tokens (2 real gloo processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe
from moe import MoEConfig, MoELayer
from moe.balance import updated_expert_bias
from tests.runs import free_port


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, router="random", balance="bias")
        model = torch.nn.Sequential(MoELayer(cfg, layer_idx=0), MoELayer(cfg, layer_idx=1)).train()
        torch.manual_seed(100 + rank)  # different tokens on each rank
        for _ in range(2):  # two micro-batches
            model(torch.randn(10 + 7 * rank, 8))
        local = torch.stack([layer.router.pending_tokens.clone() for layer in model])
        summed = moe.update_expert_biases(model, group=dist.group.WORLD)
        biases = torch.stack([layer.router.expert_bias for layer in model])
        torch.save({"local": local, "summed": summed, "biases": biases}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_bias_update_sums_counts_over_ranks(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    total = r0["local"] + r1["local"]
    assert not torch.equal(r0["local"], r1["local"])  # the ranks really routed different tokens
    assert torch.equal(r0["summed"], total) and torch.equal(r1["summed"], total)
    assert torch.equal(r0["biases"], r1["biases"])  # identical on every rank
    torch.testing.assert_close(r0["biases"], updated_expert_bias(torch.zeros(2, 4), total, 1e-3), rtol=0, atol=0)
