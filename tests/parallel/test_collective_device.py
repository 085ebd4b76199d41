"""Every collective gets tensors on its process group's device (CUDA for NCCL, CPU for gloo).

``moe.devices.collective_device`` is the one place that names
that device. The two-rank test runs the trainer's, the evaluator's, the bias update's, the stop
flag's, the checkpoint check's and the expert-parallel exchange's collectives with the model on the
CPU and a process group that, like NCCL, takes tensors on one other device only and rejects the
rest (``tests/parallel/device_group.py``): a tensor left on the model's device fails it, as CPU
tensors handed to NCCL failed training on an H100.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.devices import collective_device
from tests.runs import TINY, free_port


def test_collective_device_follows_the_backend(monkeypatch):
    """NCCL: the current CUDA device; gloo: the CPU; a backend registered for other devices only:
    the first of them."""
    for backend, expected in (("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                              ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, name=backend: name)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert collective_device() == expected, backend
    monkeypatch.setitem(dist.Backend.backend_capability, "xla_like", ["xla"])
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "xla_like")
    assert collective_device() == torch.device("xla")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from tests.parallel import device_group

    group_device = device_group.init(rank, world, port)
    try:
        _run_every_collective(rank, world, group_device, out_dir)
    finally:
        dist.destroy_process_group()


def _run_every_collective(rank: int, world: int, group_device: torch.device, out_dir: str) -> None:
    from launch import train
    from launch.config import load_run_config
    from launch.data import validation_windows
    from launch.evaluate import evaluate
    from moe import LoadMeter, MoETransformer, collect_aux_losses, max_violation, moe_layers, update_expert_biases
    from parallel.checkpoint import verify_replicas
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.groups import ExpertParallelGroups
    from tests.parallel.device_group import LazyStrictGroup

    assert collective_device() == group_device
    device = torch.device("cpu")  # the model's
    cfg = load_run_config(TINY, ["model.num_layers=2", "model.max_seq_len=16", "model.moe.hidden_size=16",
                                 "model.moe.ffn_hidden_size=16", "model.moe.num_experts=4", "model.moe.k_max=4",
                                 "model.moe.expert_backend=loop", "train.seq_len=16"])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    world_group = dist.group.WORLD
    # expert parallelism over the 2 ranks: the dispatcher's counts and rows go through all-to-all
    groups = ExpertParallelGroups(size=world, rank=rank, group=world_group, data_parallel_group=None,
                                  data_parallel_size=1, name=f"ep_size_{world}")
    apply_expert_parallel(model, groups)
    model = model.train()
    layers = dict(moe_layers(model))
    meter = LoadMeter(model)
    generator = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, 256, (2, 17), generator=generator)
    _, loss = model(batch[:, :-1].to(device), labels=batch[:, 1:].to(device))
    aux = collect_aux_losses(model)
    (loss + aux if aux is not None else loss).backward()
    meter.update()
    result = {"local_loss": float(loss)}

    from parallel.expert_parallel import is_expert_parameter

    squares = [0.0, 0.0]  # [replicated, this rank's expert slices]
    for param in model.parameters():
        if param.grad is not None:
            squares[int(is_expert_parameter(param))] += float(param.grad.double().square().sum())
    result["squares"] = squares
    result["grad_norm"] = train._grad_norm(model, world_group)
    result["bias_counts"] = update_expert_biases(model, group=world_group).cpu().tolist()

    window = train._new_window(device)
    window["sums"][0] += loss.detach().double()
    window.update(micro=1, steps=1, seconds=1.0)
    engine = types.SimpleNamespace(module=model, get_global_grad_norm=lambda: None, get_lr=lambda: [1e-3])
    logs = train._Logs(None, enabled=False, start_step=0, total_steps=1)
    postfix = train._log_train(logs, engine, window, meter, layers, [2, 2], 1, 32, max_violation, ep_size=world)
    result["logged_loss"] = float(postfix["loss"])

    stop = train._StopRequest()
    try:
        stop.signum = 15 if rank == 1 else 0
        result["stop"] = stop.agreed()
    finally:
        stop.restore()

    tokens = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint8)  # the same split on both ranks
    evaluation = evaluate(model, tokens, validation_windows(tokens, 16, 2 * 2 * 2 * 16), 2, rank, world)
    result["eval_tokens"] = evaluation["tokens"]
    result["eval_loss"] = evaluation["loss"]

    verify_replicas(model)
    result["calls"] = LazyStrictGroup.calls
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_every_collective_gets_tensors_on_the_process_groups_device(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        kinds = {name for name, _ in result["calls"]}
        assert {"allreduce", "allgather", "alltoall_base"} <= kinds, kinds
        assert all(devices == ["lazy"] for _, devices in result["calls"]), result["calls"]
    r0, r1 = ranks
    # the reductions really ran: both ranks see the same global values, built from both ranks' parts
    assert r0["local_loss"] != r1["local_loss"]
    assert r0["logged_loss"] == r1["logged_loss"]
    assert math.isclose(r0["logged_loss"], round((r0["local_loss"] + r1["local_loss"]) / 2, 3), abs_tol=1.5e-3)
    expert_squares = r0["squares"][1] + r1["squares"][1]  # expert slices summed over the ranks
    for result in ranks:
        assert result["grad_norm"] == pytest.approx(math.sqrt(result["squares"][0] + expert_squares), rel=1e-5)
    assert r0["bias_counts"] == r1["bias_counts"]
    assert r0["stop"] == r1["stop"] == 15
    assert r0["eval_tokens"] == r1["eval_tokens"] == 2 * 2 * 2 * 16
    assert r0["eval_loss"] == pytest.approx(r1["eval_loss"])


def test_a_restored_adamw_step_lives_where_torchs_implementation_reads_it():
    """Resuming at another layout writes AdamW's state by hand: the fused (GPU) AdamW reads ``step``
    on the parameter's device, the others on the CPU (a CPU step under fused AdamW on CUDA fails the
    first optimizer step after the resume)."""
    from parallel.checkpoint import _step_tensor

    param = torch.empty(3, device="meta")  # stands for a parameter on an accelerator
    fused = types.SimpleNamespace(defaults={"fused": True})
    plain = types.SimpleNamespace(defaults={"fused": None, "foreach": None})
    assert _step_tensor(fused, param, 7).device == param.device
    assert _step_tensor(plain, param, 7).device == torch.device("cpu")
    cpu_param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([cpu_param], fused=True)
    optimizer.state[cpu_param] = {"step": _step_tensor(optimizer, cpu_param, 7), "exp_avg": torch.zeros(3),
                                  "exp_avg_sq": torch.zeros(3)}
    cpu_param.grad = torch.ones(3)
    optimizer.step()  # the restored state is one torch's fused AdamW accepts
    assert float(optimizer.state[cpu_param]["step"]) == 8
