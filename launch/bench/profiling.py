"""Where a benchmark's time goes, from torch.profiler: shared by ``moe bench step`` and ``moe bench layer``.

- :func:`profile_calls` runs a callable a few times under the profiler and returns the top kernels
  by device time (CUDA), or the top ops by self CPU time (elsewhere), with the total per call and
  the number of kernels launched per call.
- :func:`profiled_events` turns the profiler's ``key_averages()`` into (name, µs, calls).
- :func:`top_kernels` ranks those and expresses them per call.

On CUDA, the kernel total per call is the time the GPU was busy: the rest of a call's wall time it
waited for the host (launches, Python) or for a synchronisation.
"""

from __future__ import annotations

from typing import Callable

import torch

TOP_KERNELS = 10


def top_kernels(events: list[tuple[str, float, int]], steps: int, top: int = TOP_KERNELS) -> dict:
    """``events``: (name, total time in µs, calls) over ``steps`` profiled steps (or calls). Returns the
    total ms per step, the launches per step (all events' calls) and the ``top`` largest as {name,
    ms_per_step, share (of the total), calls_per_step}."""
    steps = max(1, steps)
    total_us = sum(max(0.0, us) for _, us, _ in events)
    ranked = sorted((e for e in events if e[1] > 0), key=lambda e: (-e[1], e[0]))[:top]
    return {
        "total_ms_per_step": total_us / 1e3 / steps,
        "calls_per_step": sum(calls for _, _, calls in events) / steps,
        "kernels": [{"name": name, "ms_per_step": us / 1e3 / steps, "share": us / total_us if total_us else None,
                     "calls_per_step": calls / steps} for name, us, calls in ranked],
    }


def profiled_events(averages, cuda: bool, cuda_type) -> list[tuple[str, float, int]]:
    """(name, µs, calls) of the profiler's ``key_averages()``: on CUDA the kernels (device events)
    by self device time, leaving out the GPU side of user annotations (the optimizer's
    "Optimizer.step#AdamW.step" range spans its kernels, which would count twice); on CPU every op
    by self CPU time."""
    events = []
    for event in averages:
        if cuda:
            if event.device_type != cuda_type or getattr(event, "is_user_annotation", False):
                continue
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = event.self_cuda_time_total
        else:
            us = event.self_cpu_time_total
        events.append((event.key, float(us), int(event.count)))
    return events


def profile_calls(call: Callable[[], object], calls: int, device: torch.device, top: int = TOP_KERNELS,
                  before_each: Callable[[], object] = lambda: None) -> dict:
    """torch.profiler over ``calls`` calls of ``call()`` (``before_each()`` runs before each, inside the
    profile: keep it free of device work). On CUDA the kernels by device time, elsewhere the ops by
    self CPU time; :func:`top_kernels`' dict per call, plus ``calls`` and ``what``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from moe.devices import synchronize

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            before_each()
            call()
        synchronize(device)
    result = top_kernels(profiled_events(prof.key_averages(), cuda, DeviceType.CUDA), calls, top)
    result.update(steps=calls, what="CUDA kernels by device time" if cuda else "ops by self CPU time")
    return result


def short_name(name: str, width: int = 90) -> str:
    """A kernel name cut to ``width`` characters (C++ templates make them long)."""
    name = " ".join(name.split())
    return name if len(name) <= width else name[: width - 3] + "..."
