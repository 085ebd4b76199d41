"""Where a router's selection and the grouping of its choices run as Triton kernels.

- :func:`kernels.triton_ops.topk_route_triton`: top-k, gate weights and per-expert counts from the
  fp32 logits in one kernel (instead of torch's softmax, top-k, gather, normalisation and count);
- :func:`kernels.triton_ops.group_by_expert_triton`: the choices grouped by expert by a counting sort
  (instead of an argsort and its bookkeeping).

Both run on CUDA tensors (and on CPU tensors in Triton's interpreter when ``SLIMMOE_TRITON_ON_CPU=1``
asks for the Triton path there, as for the expert MLP), for up to 1024 experts.
``SLIMMOE_ROUTING_KERNELS=0`` turns both off everywhere (to compare with the torch path: the same
choices and grouping, weights equal up to fp32 rounding).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from kernels.grouped_mm import triton_on_cpu
from kernels.triton_ops import (
    _TRITON_IMPORTABLE,
    GROUPING_MAX_EXPERTS,
    ROUTING_MAX_EXPERTS,
    group_by_expert_triton,
    topk_route_triton,
)

__all__ = ["group_by_expert_triton", "grouping_kernel_applies", "routing_kernel_applies", "routing_kernels",
           "topk_route_triton"]


_OVERRIDE: Optional[bool] = None


@contextlib.contextmanager
def routing_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, the routing kernels are used where they apply (``True``) or nowhere
    (``False``), whatever ``SLIMMOE_ROUTING_KERNELS`` says (benchmarks compare the two paths)."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, bool(enabled)
    try:
        yield
    finally:
        _OVERRIDE = previous


def _kernels_on(tensor: torch.Tensor) -> bool:
    enabled = _OVERRIDE
    if enabled is None:
        enabled = os.environ.get("SLIMMOE_ROUTING_KERNELS", "1").lower() not in ("0", "false", "no", "off")
    if not enabled:
        return False
    if not _TRITON_IMPORTABLE:
        return False
    return tensor.device.type == "cuda" or (tensor.device.type == "cpu" and triton_on_cpu())


def routing_kernel_applies(logits: torch.Tensor, num_experts: int) -> bool:
    """Whether :func:`topk_route_triton` selects the experts for ``logits`` (a router's ``[T, E]``)."""
    return num_experts <= ROUTING_MAX_EXPERTS and _kernels_on(logits)


def grouping_kernel_applies(indices: torch.Tensor, num_experts: int) -> bool:
    """Whether :func:`group_by_expert_triton` groups ``indices`` (a router's ``[T, k]`` choices)."""
    return num_experts <= GROUPING_MAX_EXPERTS and _kernels_on(indices)
