"""GPTQ (Frantar et al. 2022) with MoEQuant's affinity-guided Hessian (AGQ).

:class:`Hessian` accumulates ``H = sum_i c_i x_i x_i^T`` over the inputs ``x_i [in]`` of one linear
layer. With ``c_i = 1`` this is GPTQ's Hessian (up to the factor 2/n, which GPTQ's result does not
depend on because the dampening is relative to ``mean(diag(H))``); with ``c_i`` the gate weight of
token i for an expert it is MoEQuant's AGQ Hessian ``(X sqrt(c))^T (X sqrt(c))`` (paper Eq. 19),
which makes GPTQ minimise ``sum_i c_i ||W x_i - Wq x_i||^2``.

:func:`gptq` quantizes ``W [out, in]`` column by column, spreading each column's rounding error
over the columns not yet quantized through the upper Cholesky factor of ``H^-1``.

Precision: the Hessian is accumulated, dampened and inverted in float64; the column loop (weights,
errors, the inverse factor) runs in float32, like the reference implementation.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from moe.quant.quantizer import QuantizedWeight, QuantSpec, dequantize_codes, quant_params, quantize_codes

_DAMP_RETRIES = 3  # after the first attempt: dampening x10, x100, x1000


class Hessian:
    """Accumulator of ``H = sum_i c_i x_i x_i^T`` (float64 ``[in, in]``) for one linear layer.

    The raw sum is kept (no 1/n or 2/n normalisation). Partial Hessians from different workers are
    summed with :meth:`merge` or ``+=``. A plain object holding tensors, so it pickles.
    """

    def __init__(self, in_features: int, device: Union[torch.device, str, None] = None) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"Hessian.in_features={in_features!r} is invalid: expected an integer >= 1")
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)  # [in, in]
        self.count = 0
        """Number of input rows seen."""
        self.total_weight = 0.0
        """Sum of the row weights c_i (equals ``count`` when no weights were given)."""

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated float64 ``[in, in]`` sum (the live buffer: do not modify it in place)."""
        return self._sum

    @property
    def device(self) -> torch.device:
        """Device the sum lives on."""
        return self._sum.device

    def add(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> "Hessian":
        """Add ``sum_i c_i x_i x_i^T`` for the rows of ``x [n, in]`` (or ``[..., in]``, flattened).

        ``weight [n]`` (or ``x.shape[:-1]``) holds the non-negative ``c_i``; ``None`` means all ones.
        Rows are scaled by ``sqrt(c_i)`` before the product (MoEQuant's ``add_batch_score``), so
        ``weight=ones`` gives a bit-identical result to ``weight=None``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Hessian.add: x has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float64)  # [n, in]
        if weight is None:
            added_weight = float(rows.shape[0])
        else:
            c = weight.detach().to(device=self.device, dtype=torch.float64)
            if c.numel() != rows.shape[0] or c.shape not in (x.shape[:-1], torch.Size([rows.shape[0]])):
                raise ValueError(f"Hessian.add: weight has shape {tuple(weight.shape)}; expected "
                                 f"{tuple(x.shape[:-1])} (one weight per row of x)")
            c = c.reshape(-1)  # [n]
            if not torch.isfinite(c).all():
                raise ValueError("Hessian.add: weight has non-finite entries")
            if (c < 0).any():
                raise ValueError(f"Hessian.add: weight has negative entries (min {c.min().item():g}); "
                                 "gate weights must be >= 0")
            rows = rows * c.sqrt().unsqueeze(1)  # [n, in]
            added_weight = float(c.sum())
        self._sum += rows.T @ rows
        self.count += rows.shape[0]
        self.total_weight += added_weight
        return self

    def merge(self, other: "Hessian") -> "Hessian":
        """Add another partial Hessian of the same layer into this one (in place); returns ``self``."""
        if not isinstance(other, Hessian):
            raise TypeError(f"Hessian.merge expects a Hessian, got {type(other).__name__}")
        if other.in_features != self.in_features:
            raise ValueError(f"Hessian.merge: in_features {other.in_features} != {self.in_features}")
        self._sum += other._sum.to(self.device)
        self.count += other.count
        self.total_weight += other.total_weight
        return self

    def __iadd__(self, other: "Hessian") -> "Hessian":
        return self.merge(other)

    def to(self, device: Union[torch.device, str]) -> "Hessian":
        """Move the sum to ``device`` (in place); returns ``self``."""
        self._sum = self._sum.to(device)
        return self

    def __repr__(self) -> str:
        return (f"Hessian(in_features={self.in_features}, count={self.count}, "
                f"total_weight={self.total_weight:g}, device={self.device})")


def _upper_inverse_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of ``(H + damp I)^-1`` (so ``H^-1 = U^T U``), float64 ``[in, in]``.

    ``damp = percdamp * mean(diag(H))``; when a factorisation fails the dampening grows 10x, up to
    ``_DAMP_RETRIES`` times, before a ``ValueError``.
    """
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    frac = percdamp
    for _ in range(_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + (frac * mean_diag) * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        frac = frac * 10 if frac > 0 else 1e-2
    raise ValueError(f"gptq: the Hessian is not positive definite, even with dampening {frac / 10:g} x mean(diag(H)); "
                     "collect more calibration rows or raise percdamp")


def gptq(
    weight: torch.Tensor,
    hessian: Union[torch.Tensor, Hessian],
    spec: QuantSpec,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with GPTQ given the input Hessian ``[in, in]`` (or a :class:`Hessian`).

    - Dead inputs (``diag(H) == 0``) get ``H_jj = 1`` and a zero weight column.
    - ``act_order``: columns are processed in order of decreasing ``diag(H)``. With groups, the group
      grids are then *static*: computed up front on the (dead-zeroed) original weight for the natural
      contiguous column groups, so the stored groups stay contiguous.
    - Without ``act_order``, a group's grid is computed when the group's first column is reached, on
      the fully error-updated weight (the pending in-block updates are applied to the group's columns
      first, so the result does not depend on ``block_size``). Per-row grids (``group_size=-1``) are
      computed once, up front.
    - ``percdamp * mean(diag(H))`` is added to the diagonal; on a failed Cholesky it grows 10x (3 times)
      before a ``ValueError``.

    Returns a :class:`QuantizedWeight` whose ``dequantize()`` is exactly the GPTQ result.
    """
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"gptq expects a non-empty 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size={block_size!r} is invalid: expected an integer >= 1")
    if not percdamp >= 0:
        raise ValueError(f"gptq: percdamp={percdamp!r} is invalid: expected a number >= 0")
    out_features, in_features = weight.shape
    h = hessian.matrix if isinstance(hessian, Hessian) else hessian
    if tuple(h.shape) != (in_features, in_features):
        raise ValueError(f"gptq: Hessian has shape {tuple(h.shape)}; expected ({in_features}, {in_features}) "
                         f"for a weight of shape {tuple(weight.shape)}")
    device = weight.device
    h = h.detach().to(device=device, dtype=torch.float64).clone()  # [in, in]
    if not torch.isfinite(h).all():
        raise ValueError("gptq: the Hessian has non-finite entries")
    w = weight.detach().to(torch.float32).clone()  # [out, in]
    if not torch.isfinite(w).all():
        raise ValueError("gptq: the weight has non-finite entries")

    dead = torch.diagonal(h) == 0  # [in]
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    grouped = spec.group_size != -1
    num_groups = spec.num_groups(in_features)
    scales = torch.empty(out_features, num_groups, dtype=torch.float32, device=device)  # [out, G]
    zeros = torch.empty_like(scales)  # [out, G]
    if not grouped:
        scales[:, 0], zeros[:, 0] = quant_params(w, spec)
    elif act_order:  # static groups on the natural column order
        for g in range(num_groups):
            scales[:, g], zeros[:, g] = quant_params(w[:, g * spec.group_size:(g + 1) * spec.group_size], spec)

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)  # [in] processing -> natural
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = None
    col_group = spec.column_groups(in_features)  # [in], natural order
    if perm is not None:
        col_group = col_group[perm.cpu()]  # group of each processed column
    col_group = col_group.tolist()  # a Python list: no device sync per column

    u = _upper_inverse_factor(h, percdamp).to(torch.float32)  # [in, in], H^-1 = U^T U
    del h
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)  # [out, in], processing order
    scale, zero = scales[:, 0], zeros[:, 0]

    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        wb = w[:, b0:b1].clone()  # [out, nb] block columns, updated within the block
        errb = torch.zeros_like(wb)  # [out, nb] scaled errors err_i = (w_i - q_i) / U_ii
        ub = u[b0:b1, b0:b1]  # [nb, nb]
        for i in range(b1 - b0):
            col = b0 + i
            if grouped:
                g = col_group[col]
                if not act_order and col % spec.group_size == 0:
                    g_end = min(col + spec.group_size, in_features)
                    current = wb[:, i:min(g_end, b1) - b0]  # [out, <= group_size]
                    if g_end > b1:  # group reaches past the block: apply the pending updates to those columns
                        ahead = w[:, b1:g_end] - errb @ u[b0:b1, b1:g_end]
                        current = torch.cat([current, ahead], dim=1)
                    scales[:, g], zeros[:, g] = quant_params(current, spec)
                scale, zero = scales[:, g], zeros[:, g]
            column = wb[:, i]  # [out]
            q = quantize_codes(column, scale, zero, spec.maxq)  # [out]
            codes[:, col] = q
            err = (column - dequantize_codes(q, scale, zero)) / ub[i, i]  # [out]
            errb[:, i] = err
            wb[:, i + 1:] -= err.unsqueeze(1) * ub[i, i + 1:].unsqueeze(0)
        w[:, b1:] -= errb @ u[b0:b1, b1:]  # lazy batch update of the later columns

    if perm is not None:
        natural = torch.empty_like(codes)
        natural[:, perm] = codes
        codes = natural
    return QuantizedWeight(codes, scales, zeros, spec)


def layer_output_error(
    weight: torch.Tensor,
    qweight: torch.Tensor,
    x: torch.Tensor,
    row_weight: Optional[torch.Tensor] = None,
) -> float:
    """``sum_i c_i ||W x_i - Wq x_i||^2`` over the rows of ``x [n, in]`` (``c_i = 1`` when
    ``row_weight [n]`` is None), computed in float64. ``weight``/``qweight`` are ``[out, in]``."""
    diff = x.double() @ (weight.double() - qweight.double()).T  # [n, out]
    per_row = diff.pow(2).sum(dim=1)  # [n]
    if row_weight is not None:
        per_row = per_row * row_weight.double()
    return float(per_row.sum())
