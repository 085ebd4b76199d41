"""Uniform integer weight quantization: the spec, the grid, and the round-to-nearest baseline.

Weight convention everywhere in ``moe.quant``: a linear weight ``W [out, in]`` (like
``nn.Linear.weight``), applied as ``y = x @ W.T``. Quantization parameters are per output row and,
with ``group_size > 0``, per group of ``group_size`` consecutive input columns (column ``j`` belongs
to group ``j // group_size``; the last group is shorter when ``group_size`` does not divide ``in``).

Codes are unsigned integers ``q`` in ``[0, maxq]`` with ``maxq = 2**bits - 1``; the value a code
stands for is ``scale * (q - zero)``:

- symmetric (QuaRot / MoEQuant): ``scale = max|w| / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)``, so
  the signed levels are ``-2**(bits-1) .. 2**(bits-1) - 1``;
- asymmetric (GPTQ reference min-max): ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)``,
  ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``.

A row (group) that is all zeros gets the scale it would have with ``max|w| = 1`` (symmetric) or
``[xmin, xmax] = [-1, 1]`` (asymmetric), so nothing ever divides by zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Optional

import torch

from moe.validation import check_bool, fail, from_dict

_OWNER = "QuantSpec"


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: bit width, grouping along the input dimension, grid symmetry."""

    bits: int = 4
    """Bits per code, 2..8. Codes are unsigned integers in ``[0, 2**bits - 1]``."""

    group_size: int = -1
    """-1: one (scale, zero) per output row. Otherwise a positive number of consecutive input
    columns sharing one (scale, zero) per row; the last group may be shorter."""

    symmetric: bool = True
    """True: QuaRot/MoEQuant symmetric grid (zero = 2**(bits-1), scale from max|w|). False: GPTQ's
    asymmetric min-max grid (the range always includes 0)."""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            fail(_OWNER, "bits", self.bits, "expected an integer in 2..8")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs >= 1):
            fail(_OWNER, "group_size", gs, "expected -1 (one group per output row) or a positive integer")
        check_bool(_OWNER, "symmetric", self.symmetric)

    @property
    def maxq(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return 2**self.bits - 1

    def num_groups(self, in_features: int) -> int:
        """Number of column groups G of a weight with ``in_features`` columns."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def group_of_column(self, column: int) -> int:
        """Group index of input column ``column`` (``column // group_size``; 0 when per row)."""
        return 0 if self.group_size == -1 else column // self.group_size

    def column_groups(self, in_features: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Group index of every input column: int64 ``[in_features]``."""
        cols = torch.arange(in_features, device=device)
        return torch.zeros_like(cols) if self.group_size == -1 else cols // self.group_size

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON/YAML friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "QuantSpec":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        return from_dict(cls, values, owner=_OWNER)


def quant_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of ``w [out, cols]``: ``(scale [out], zero [out])``, both fp32.

    ``zero`` is integer valued (stored as float). ``scale`` is always positive.
    """
    if w.dim() != 2:
        raise ValueError(f"quant_params expects a 2-D weight [out, cols], got shape {tuple(w.shape)}")
    w = w.float()
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        amax = w.abs().amax(dim=1)  # [out]
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = amax / (half - 1)
        zero = torch.full_like(scale, float(half))
        return scale, zero
    xmin = w.amin(dim=1).clamp(max=0.0)  # [out]
    xmax = w.amax(dim=1).clamp(min=0.0)  # [out]
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / spec.maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t [out]`` -> ``[out, 1]`` so that it broadcasts over the columns of ``like [out, cols]``."""
    return t.unsqueeze(-1) if t.dim() == like.dim() - 1 else t


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest codes of ``w [out, cols]`` (or ``[out]``) on the grid ``(scale, zero)``: uint8, same shape.

    ``scale``/``zero`` are per row (``[out]``) or already broadcastable (``[out, cols]``, ``[out, 1]``).
    ``q = clamp(round(w / scale) + zero, 0, maxq)`` (round half to even, as torch.round).
    """
    scale, zero = _per_row(scale, w), _per_row(zero, w)
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, maxq).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Values of ``codes`` on the grid: ``scale * (q - zero)``, fp32, shape of ``codes``."""
    scale, zero = _per_row(scale, codes), _per_row(zero, codes)
    return scale * (codes.float() - zero)


@dataclass
class QuantizedWeight:
    """A quantized linear weight with its per-(row, group) grid.

    ``codes`` uint8 ``[out, in]`` (unpacked, one code per element), ``scales`` fp32 ``[out, G]``,
    ``zeros`` fp32 ``[out, G]`` (integer valued), ``spec`` the :class:`QuantSpec` used. Column ``j``
    uses ``scales[:, j // group_size]`` (``G = 1`` and group 0 when ``group_size == -1``).
    ``eora``: an optional low-rank correction (:class:`moe.quant.eora.LowRankCorrection`) that the
    served weight adds to the grid values (:meth:`effective`); :meth:`dequantize` never includes it.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    eora: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"QuantizedWeight.codes must be uint8 [out, in], got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        out, cols = self.codes.shape
        want = (out, self.spec.num_groups(cols))
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if tuple(t.shape) != want:
                raise ValueError(f"QuantizedWeight.{name} has shape {tuple(t.shape)}; expected {want} for codes "
                                 f"{tuple(self.codes.shape)} and group_size={self.spec.group_size}")

    @property
    def shape(self) -> torch.Size:
        """``(out, in)`` of the weight."""
        return self.codes.shape

    def to(self, device) -> "QuantizedWeight":
        """The same weight with its tensors on ``device``."""
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device),
                       zeros=self.zeros.to(device), eora=None if self.eora is None else self.eora.to(device))

    def group_of_column(self, column: int) -> int:
        """Group index of input column ``column``."""
        return self.spec.group_of_column(column)

    def column_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element grid: ``(scale [out, in], zero [out, in])``."""
        groups = self.spec.column_groups(self.codes.shape[1], device=self.codes.device)  # [in]
        return self.scales[:, groups], self.zeros[:, groups]

    def dequantize(self) -> torch.Tensor:
        """The quantized weight as fp32 ``[out, in]``."""
        scale, zero = self.column_scales_zeros()
        return dequantize_codes(self.codes, scale, zero)

    def effective(self) -> torch.Tensor:
        """The weight the model computes with, fp32 ``[out, in]``: :meth:`dequantize` plus the EoRA
        correction ``B @ A`` when there is one."""
        weight = self.dequantize()
        return weight if self.eora is None else weight + self.eora.delta().to(weight.device)


def group_bounds(in_features: int, spec: QuantSpec) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` column ranges of the groups, in order."""
    size = in_features if spec.group_size == -1 else spec.group_size
    return [(s, min(s + size, in_features)) for s in range(0, in_features, size)]


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest baseline: each (row, group) gets its min-max grid, each element its nearest code.

    ``weight [out, in]`` -> :class:`QuantizedWeight`.
    """
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"rtn expects a non-empty 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)  # [out, in]
    scales, zeros = [], []
    for start, end in group_bounds(w.shape[1], spec):
        scale, zero = quant_params(w[:, start:end], spec)  # [out], [out]
        codes[:, start:end] = quantize_codes(w[:, start:end], scale, zero, spec.maxq)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, torch.stack(scales, dim=1), torch.stack(zeros, dim=1), spec)
