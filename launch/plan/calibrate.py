"""``moe plan --calibrate-cpu``: measure this machine's numbers for a CPU cluster description.

It starts ``ranks`` processes joined by gloo, each with cores / ranks threads (what ``moe bench ep``
and ``moe train --nproc`` give each rank), and measures, all ranks at once:

    peak_flops             fp32 matmul FLOP/s of a 1024^3 matmul on one rank
    matmul_efficiency      a [2048, 128] x [128, 384] matmul's rate over that (a small model's width)
    memory_gbps            a + b into c over 32 MiB fp32 tensors: 3 x 32 MiB / time
    op_overhead_us         forward + backward of a chain of ops on 8-element tensors: time per
                           dispatched op (counted the way ``moe plan`` counts a model's)
    intra_node_gbps        all_to_all_single of 16 MiB fp32 between the ranks: bytes sent per
                           rank / time (gloo; the all-reduce's bus bandwidth is printed beside it)
    collective_latency_us  half the time of an all-reduce of one number (a ring of two has two steps)

Each figure is the median of several repeats. It prints a whole cluster file with the date, the
command and the load average in its comments and ``provenance``: ``configs/clusters/cpu2.yaml``.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ops_per_second_chain(torch, repeats: int) -> float:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, requires_grad=True)

    def chain():
        y = x
        for _ in range(50):
            y = (y * 1.0001 + 0.5).relu()
        y.sum().backward()

    with Counter():
        chain()
    ops = Counter.ops
    return _timed(chain, repeats) / ops


def _rank(rank: int, world: int, port: int, threads: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    repeats = 7

    def together(fn):
        dist.barrier()
        return _timed(fn, repeats)

    big = torch.randn(1024, 1024), torch.randn(1024, 1024)
    small = torch.randn(2048, 128), torch.randn(128, 384)
    big_rates, small_rates = [], []
    dist.barrier()
    for _ in range(3 * repeats):  # interleaved, so that both see the same share of a busy machine
        big_rates.append(2 * 1024**3 / _timed(lambda: big[0] @ big[1], 1))
        small_rates.append(20 * 2 * 2048 * 128 * 384 / _timed(lambda: [small[0] @ small[1] for _ in range(20)], 1))
    peak, small_rate = statistics.median(big_rates), statistics.median(small_rates)
    a, b, c = (torch.randn(8 << 20) for _ in range(3))  # 32 MiB each
    memory = 3 * a.numel() * 4 / together(lambda: torch.add(a, b, out=c))
    dist.barrier()
    op_s = _ops_per_second_chain(torch, repeats)
    payload = torch.randn(4 << 20)  # 16 MiB
    received = torch.empty_like(payload)
    a2a_s = together(lambda: dist.all_to_all_single(received, payload))
    allreduce_s = together(lambda: dist.all_reduce(payload))
    one = torch.zeros(1)
    latency_s = together(lambda: dist.all_reduce(one))
    nbytes = payload.numel() * 4
    sent = nbytes * (world - 1) / world
    row = {"peak_flops": peak, "matmul_efficiency": small_rate / peak, "memory_gbps": memory / 1e9,
           "op_overhead_us": op_s * 1e6, "intra_node_gbps": sent / a2a_s / 1e9,
           "allreduce_bus_gbps": 2 * (world - 1) / world * nbytes / allreduce_s / 1e9,
           "collective_latency_us": latency_s / (2 * (world - 1)) * 1e6}
    results[rank] = row
    dist.barrier()
    dist.destroy_process_group()


def calibrate_cpu(ranks: int = 2) -> dict:
    """The per-rank figures (the median over ranks of each), measured with ``ranks`` gloo processes."""
    import torch.multiprocessing as mp

    from parallel.engine import free_port

    threads = max(1, (os.cpu_count() or ranks) // ranks)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(ranks, free_port(), threads, results), nprocs=ranks, join=True,
                           start_method="spawn")
        rows = [dict(results[r]) for r in range(ranks)]
    out = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    out["threads_per_rank"] = threads
    return out


def as_yaml(values: dict, ranks: int) -> str:
    """A whole cluster file for this machine from the measured values, saying where and when."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    command = f"moe plan --calibrate-cpu --ranks {ranks}"
    measured = f"measured by `{command}` on {when}"
    return "\n".join([
        f"# This machine as {ranks} gloo ranks of {values['threads_per_rank']} thread(s) on {os.cpu_count()} cores: "
        "the cluster `moe bench ep` runs on.",
        "# Fields: launch/plan/cluster.py; bandwidths in GB/s per rank.",
        f"# Written by `{command}` on {when}, load average {load}.",
        "# Other work on the machine slows every figure: compare with `moe bench ep` runs made under the same load.",
        f"name: this machine, {ranks} CPU ranks of {values['threads_per_rank']} thread(s)",
        "device: cpu",
        f"gpus_per_node: {ranks}",
        "nodes: 1",
        f"peak_flops: {values['peak_flops']:.4g}",
        f"matmul_efficiency: {min(1.0, values['matmul_efficiency']):.3g}",
        f"memory_gib: {ram_gib / ranks:.3g}",
        f"memory_gbps: {values['memory_gbps']:.3g}",
        f"op_overhead_us: {values['op_overhead_us']:.3g}",
        f"intra_node_gbps: {values['intra_node_gbps']:.3g}",
        f"inter_node_gbps: {values['intra_node_gbps']:.3g}",
        f"collective_latency_us: {values['collective_latency_us']:.3g}",
        "memory_reserve_gib: 0.6",
        "provenance:",
        f'  peak_flops: "{measured}: fp32 1024^3 matmul on one rank while every rank runs one"',
        f'  matmul_efficiency: "{measured}: a [2048,128]x[128,384] matmul over the 1024^3 rate '
        f'({values["matmul_efficiency"]:.3g}, at most 1)"',
        f'  memory_gib: "the machine\'s RAM ({ram_gib:.1f} GiB) shared by {ranks} ranks"',
        f'  memory_gbps: "{measured}: c = a + b over 32 MiB fp32 tensors"',
        f'  op_overhead_us: "{measured}: forward + backward of a chain of ops on 8 numbers, per dispatched op"',
        f'  intra_node_gbps: "{measured}: all_to_all_single of 16 MiB, bytes sent per rank / time '
        f'(the all-reduce\'s bus bandwidth was {values["allreduce_bus_gbps"]:.3g})"',
        '  inter_node_gbps: "one node: unused, set equal to intra_node_gbps"',
        f'  collective_latency_us: "{measured}: an all-reduce of one number over 2 ring steps"',
        '  memory_reserve_gib: "assumed: a rank\'s Python, torch and DeepSpeed before any tensor"',
    ])
