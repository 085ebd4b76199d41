"""Where tensors live: the one place that names the device of a process group's collectives and
the device a loaded model runs on.

- :func:`collective_device`: every tensor handed to a collective (the trainer's logs, validation,
  bias counts, stop flags, expert-parallel statistics and exchanges, checkpoint checks) is on this
  device of its process group: CUDA under NCCL, the CPU under gloo.
- :func:`resolve_device`: the device ``moe eval``, ``moe slim``, ``moe generate``, ``moe quantize``
  and :func:`moe.load_pretrained` run a model on: CUDA when there is a GPU, unless told otherwise.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from moe.errors import UserError


def default_device() -> torch.device:
    """The current CUDA device when there is a GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a ``torch.device`` (None or "auto": :func:`default_device`); a device this
    machine does not have is a :class:`~moe.errors.UserError`."""
    if device is None or device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is invalid: expected cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device!r}: this machine has no CUDA GPU (torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise UserError(f"--device {device!r} is invalid: expected cpu, cuda, cuda:N or auto")
    return resolved


def describe_device(device: torch.device) -> str:
    """A device as tables name it: ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (16 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU's kernels run after the host returns); nothing
    to wait for on the CPU. Clocks read after it measure the work, not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collective_device(group=None) -> torch.device:
    """The device of the tensors a collective on ``group`` (default: the world) must be given.

    This is the one place that says it: the current CUDA device for NCCL; the CPU for gloo (and any
    backend that takes CPU tensors); otherwise the first device type the backend was registered for
    (``torch.distributed.Backend.backend_capability``). NCCL rejects CPU tensors ("No backend type
    associated with device type cpu"), so every tensor the trainer, the evaluator, the checkpoint
    code and the dispatcher hand to a collective is made on, or moved to, this device."""
    backend = str(dist.get_backend(group)).lower()
    devices = dist.Backend.backend_capability.get(backend)
    if devices is None:  # a "cpu:gloo,cuda:nccl" style mixed backend: what each device type maps to
        devices = [part.split(":")[0] for part in backend.split(",") if ":" in part] or ["cpu"]
    if "cpu" in devices:
        return torch.device("cpu")
    if "cuda" in devices:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(devices[0])


def on_collective_device(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``tensor`` on :func:`collective_device` of ``group`` (itself when it is there already)."""
    return tensor.to(collective_device(group))


# Peak dense (no sparsity) bf16 tensor-core FLOP/s of one device, from the vendors' data sheets; the
# first entry whose words all appear in torch.cuda.get_device_name() wins, so variants come first.
DENSE_BF16_PEAK_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989.4e12),  # SXM (the name says "HBM3")
    (("H200",), 989.4e12),
    (("H800",), 989.4e12),
    (("GH200",), 989.4e12),
    (("B200",), 2250e12),
    (("B100",), 1750e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362.05e12),
    (("L4",), 121e12),
)
PEAK_ENV = "SLIMMOE_PEAK_TFLOPS"
"""Overrides the table (TFLOP/s of one device), for a device it lacks."""


def dense_bf16_peak_flops(device_name: str, environ=None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device called ``device_name`` (``SLIMMOE_PEAK_TFLOPS`` if set,
    else :data:`DENSE_BF16_PEAK_FLOPS`); None for a device the table does not know."""
    import os

    override = (os.environ if environ is None else environ).get(PEAK_ENV)
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise UserError(f"{PEAK_ENV}={override!r} is invalid: expected TFLOP/s of one device, e.g. 989.4") from None
    words = device_name.replace("-", " ").split()
    for keys, peak in DENSE_BF16_PEAK_FLOPS:
        if all(any(word.upper() == key.upper() for word in words) for key in keys):
            return peak
    return None
