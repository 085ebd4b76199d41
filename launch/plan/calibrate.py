"""``moe plan --calibrate-cpu``: measure this machine's numbers for a CPU cluster description.

It starts ``ranks`` processes joined by gloo, each with cores / ranks threads (what ``moe bench ep``
and ``moe train --nproc`` give each rank), and measures, all ranks at once:

    peak_flops             fp32 matmul FLOP/s of a 1024^3 matmul on one rank
    matmul_efficiency      the rate of a [2048, 128] x [128, 384] linear layer's three training matmuls
                           (x @ w, g @ w^T, x^T @ g: a small model's width) over that
    memory_gbps            the rate at which a training step's elementwise work moves bytes: forward
                           and backward of an RMS norm, a SiLU gate, a softmax, a residual add and a
                           layout copy on [65536, 128] fp32 (32 MiB) tensors, the bytes every op reads
                           and writes over the time (on one CPU thread the transcendental ops are
                           compute-bound, several times slower than a stream: c = a + b over 32 MiB
                           is measured too and printed beside it; on a GPU both are the memory's)
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


def _elementwise_chain(torch, rows: int = 65536, width: int = 128):
    """(chain, bytes it moves): forward + backward of a block's elementwise work on one
    [rows, width] fp32 tensor; the bytes are those every dispatched op reads and writes, counted
    the way the ops run (tensors of more than 64 elements)."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Bytes(TorchDispatchMode):
        moved = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            Bytes.moved += sum(t.numel() * t.element_size() for t in tensors if t.numel() > 64)
            return out

    x = torch.randn(rows, width, requires_grad=True)
    scale = torch.ones(width, requires_grad=True)
    grad = torch.randn(width, rows)

    def chain():
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale  # RMS norm
        p = torch.softmax(F.silu(h) * h, dim=-1)  # a SiLU gate, a softmax
        (p + x).transpose(0, 1).contiguous().backward(grad)  # residual, a layout copy
        x.grad = scale.grad = None

    with Bytes():
        chain()
    return chain, Bytes.moved


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
    x, w, g = torch.randn(2048, 128), torch.randn(128, 384), torch.randn(2048, 384)

    def training_matmuls():  # a linear layer's forward and its two backward products, as training runs them
        for _ in range(7):
            x @ w, g @ w.t(), x.t() @ g

    big_rates, small_rates = [], []
    dist.barrier()
    for _ in range(3 * repeats):  # interleaved, so that both see the same share of a busy machine
        big_rates.append(2 * 1024**3 / _timed(lambda: big[0] @ big[1], 1))
        small_rates.append(7 * 3 * 2 * 2048 * 128 * 384 / _timed(training_matmuls, 1))
    peak, small_rate = statistics.median(big_rates), statistics.median(small_rates)
    operands = [torch.randn(8 << 20) for _ in range(3)]  # 32 MiB each
    stream = 3 * operands[0].numel() * 4 / together(lambda: torch.add(operands[0], operands[1], out=operands[2]))
    operands.clear()
    chain, moved = _elementwise_chain(torch)
    memory = moved / together(chain)
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
           "stream_gbps": stream / 1e9,
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
        f'  matmul_efficiency: "{measured}: x @ w, g @ w^T and x^T @ g of x [2048,128], w [128,384] over the 1024^3 rate '
        f'({values["matmul_efficiency"]:.3g}, at most 1)"',
        f'  memory_gib: "the machine\'s RAM ({ram_gib:.1f} GiB) shared by {ranks} ranks"',
        f'  memory_gbps: "{measured}: forward + backward of an RMS norm, a SiLU gate, a softmax, a residual add '
        f'and a layout copy on [65536, 128] fp32, bytes every op reads and writes / time (a stream, c = a + b '
        f'over 32 MiB, ran at {values["stream_gbps"]:.3g})"',
        f'  op_overhead_us: "{measured}: forward + backward of a chain of ops on 8 numbers, per dispatched op"',
        f'  intra_node_gbps: "{measured}: all_to_all_single of 16 MiB, bytes sent per rank / time '
        f'(the all-reduce\'s bus bandwidth was {values["allreduce_bus_gbps"]:.3g})"',
        '  inter_node_gbps: "one node: unused, set equal to intra_node_gbps"',
        f'  collective_latency_us: "{measured}: an all-reduce of one number over 2 ring steps"',
        '  memory_reserve_gib: "assumed: a rank\'s Python, torch and DeepSpeed before any tensor"',
    ])
