"""Grouped GEMM over rows grouped by expert.

Notation: N rows (token copies) sorted by expert, K input features, M output features, E experts.
``offsets`` is int32 ``[E]`` with the cumulative *end* row of each expert's group, exactly the
``offs`` argument of :func:`torch.nn.functional.grouped_mm`; group ``e`` is rows
``offsets[e-1]:offsets[e]`` (``offsets[-1] == 0``). Groups may be empty.

Backends
    ``"triton"`` on CUDA, this project's Triton kernel (:mod:`kernels.triton_ops`); on any other
                 device the ``"torch"`` backend, silently.
    ``"torch"``  :func:`torch.nn.functional.grouped_mm` where it supports the inputs (fp32 on CPU with
                 16-byte aligned rows, bf16 on CUDA), else the per-expert loop.
    ``"loop"``   one ``torch.mm`` per expert: the readable reference every other backend is held to.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("triton", "torch", "loop")


def triton_on_cpu() -> bool:
    """``SLIMMOE_TRITON_ON_CPU=1`` (with ``TRITON_INTERPRET=1``): run the "triton" backend on CPU
    tensors in Triton's interpreter instead of falling back to "torch" (slow; for debugging)."""
    return os.environ.get("SLIMMOE_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def offsets_from_counts(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Cumulative group ends, int32 ``[E]``, from per-expert row counts ``[E]``."""
    return torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)


def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm expects x [N, K] and w [E, K, M]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has K={x.shape[1]} columns but w has K={w.shape[1]} rows per expert")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_mm: offsets must be [E={w.shape[0]}], got {tuple(offsets.shape)}")
    if offsets.dtype != torch.int32:
        raise ValueError(f"grouped_mm: offsets must be int32 (as torch.nn.functional.grouped_mm), got {offsets.dtype}")


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: ``out[rows of e] = x[rows of e] @ w[e]``, one matmul per non-empty expert."""
    ends = offsets.tolist()
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end] @ w[expert]
        start = end
    return out


def _torch_grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        # The CPU kernel needs fp32 and row strides that are multiples of 16 bytes.
        return x.dtype == torch.float32 and x.shape[1] % 4 == 0 and w.shape[2] % 4 == 0
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return major >= 9 and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and w.shape[2] % 8 == 0
    return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """``out [N, M]``: each expert's rows of ``x [N, K]`` times that expert's ``w [E, K, M]``.

    Differentiable in ``x`` and ``w`` on every backend. Rows past ``offsets[-1]`` are not part of
    any group; callers pass ``offsets[-1] == N``.
    """
    _check(x, w, offsets)
    if backend == "triton":
        if x.is_cuda or triton_on_cpu():
            from kernels.triton_ops import grouped_mm_triton

            return grouped_mm_triton(x, w, offsets)
        backend = "torch"
    if backend == "torch":
        if _torch_grouped_mm_supported(x, w):
            # Non-contiguous operands (e.g. a transposed weight) are copied by the kernel anyway.
            return F.grouped_mm(x.contiguous(), w.contiguous(), offs=offsets)
        return grouped_mm_loop(x, w, offsets)
    if backend == "loop":
        return grouped_mm_loop(x, w, offsets)
    raise ValueError(f"grouped_mm: unknown backend {backend!r}; expected one of {BACKENDS}")
