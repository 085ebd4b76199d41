"""Where a router's choices are grouped by expert with the Triton counting sort
(:func:`kernels.triton_ops.group_by_expert_triton`) instead of an argsort.

The kernels run on CUDA tensors (and on CPU tensors in Triton's interpreter when
``SLIMMOE_TRITON_ON_CPU=1`` asks for the Triton path there, as for the expert MLP), for up to
``GROUPING_MAX_EXPERTS`` experts. ``SLIMMOE_GROUPING_KERNEL=0`` turns them off everywhere (to
compare the two paths; both give the same grouping).
"""

from __future__ import annotations

import os

import torch

from kernels.grouped_mm import triton_on_cpu
from kernels.triton_ops import _TRITON_IMPORTABLE, GROUPING_MAX_EXPERTS, group_by_expert_triton

__all__ = ["group_by_expert_triton", "grouping_kernel_applies"]


def grouping_kernel_applies(indices: torch.Tensor, num_experts: int) -> bool:
    """Whether the Triton counting sort groups ``indices`` (a router's ``[T, k]`` choices)."""
    if os.environ.get("SLIMMOE_GROUPING_KERNEL", "1").lower() in ("0", "false", "no", "off"):
        return False
    if not _TRITON_IMPORTABLE or num_experts > GROUPING_MAX_EXPERTS:
        return False
    return indices.device.type == "cuda" or (indices.device.type == "cpu" and triton_on_cpu())
