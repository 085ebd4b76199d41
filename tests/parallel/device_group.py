"""A process group that behaves as NCCL does about devices, on a machine without a GPU.

NCCL takes only CUDA tensors: a CPU tensor handed to it fails ("No backend type associated with
device type cpu"). On CPU, gloo takes CPU tensors, so a test on gloo cannot see code that builds
its collective tensors on the CPU instead of on the model's device. Here the model runs on torch's
lazy-tensor device (``lazy``, computed on the CPU by the TorchScript backend) and the collectives go
through ``lazy_strict``, a backend registered for the ``lazy`` device only: every tensor it is
given must be a lazy tensor (otherwise the same RuntimeError as NCCL's), and the data then travels
through an inner gloo group. Code that follows the rule (its tensors on
``parallel.engine.collective_device``) runs; code that hands the group a CPU tensor fails.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.futures import Future

BACKEND = "lazy_strict"
DEVICE = "lazy"


def start_lazy_device() -> torch.device:
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device(DEVICE)


class _Done(dist.Work):
    def __init__(self, result):
        super().__init__()
        self._future = Future()
        self._future.set_result(result)

    def wait(self, timeout: datetime.timedelta = None) -> bool:
        return True

    def get_future(self) -> Future:
        return self._future


class LazyStrictGroup(dist.ProcessGroup):
    """Collectives on lazy tensors only (the data moves over an inner gloo group)."""

    calls: list = []  # (collective, devices seen), for the test to inspect

    def __init__(self, store, rank: int, size: int, timeout):
        super().__init__(rank, size)
        self.inner = dist.ProcessGroupGloo(dist.PrefixStore("inner", store), rank, size, timeout)

    def getBackendName(self) -> str:
        return BACKEND

    @staticmethod
    def _check(name: str, tensors) -> None:
        devices = sorted({t.device.type for t in tensors})
        LazyStrictGroup.calls.append((name, devices))
        for device in devices:
            if device != DEVICE:
                raise RuntimeError(f"{BACKEND} {name}: No backend type associated with device type {device}")

    @staticmethod
    def _back(targets, sources) -> None:
        for target, source in zip(targets, sources):
            target.copy_(source.to(target.device))

    def allreduce(self, tensors, opts=None):
        self._check("allreduce", tensors)
        host = [t.cpu() for t in tensors]
        options = dist.AllreduceOptions()
        options.reduceOp = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        self.inner.allreduce(host, options).wait()
        self._back(tensors, host)
        return _Done(tensors)

    def allgather(self, output_lists, inputs, opts=None):
        self._check("allgather", [*inputs, *(t for outputs in output_lists for t in outputs)])
        host_out = [[t.cpu() for t in outputs] for outputs in output_lists]
        self.inner.allgather(host_out, [t.cpu() for t in inputs]).wait()
        for outputs, host in zip(output_lists, host_out):
            self._back(outputs, host)
        return _Done(output_lists)

    def broadcast(self, tensors, opts=None):
        self._check("broadcast", tensors)
        host = [t.cpu() for t in tensors]
        options = dist.BroadcastOptions()
        options.rootRank = opts.rootRank if opts is not None else 0
        self.inner.broadcast(host, options).wait()
        self._back(tensors, host)
        return _Done(tensors)

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        self._check("alltoall_base", [output, input])
        host = output.cpu()
        self.inner.alltoall_base(host, input.cpu(), output_split_sizes, input_split_sizes).wait()
        self._back([output], [host])
        return _Done([output])

    def barrier(self, opts=None):
        self.inner.barrier().wait()
        return _Done(None)


def register() -> None:
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, LazyStrictGroup, devices=[DEVICE])


def init(rank: int, world_size: int, port: int) -> torch.device:
    """Start the lazy device and join a ``lazy_strict`` group; returns the device."""
    device = start_lazy_device()
    register()
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    return device
