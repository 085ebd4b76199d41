"""EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation"): a rank-r correction ``B A`` added to a quantized linear, found in closed
form from the layer's calibration activations.

For a linear ``W [out, in]`` quantized to ``Wq``, the error is ``dW = W - Wq``. With the calibration
inputs ``X [n, in]`` (rows ``x_i``, under AGQ each scaled by the square root of its gate weight) and
their covariance ``C = X^T X = Q diag(lam) Q^T``, the output error of a correction M is

    ||(dW - M) X^T||_F^2 = tr((dW - M) C (dW - M)^T) = ||(dW - M) Q diag(sqrt(lam))||_F^2,

so in the eigenspace scaled by ``sqrt(lam)`` the problem is a plain low-rank approximation: with
``dW' = dW Q diag(sqrt(lam)) = U S V^T`` (SVD) the best rank-r M is (Eckart-Young)

    B = U_r S_r                              [out, r]
    A = V_r^T diag(1 / sqrt(lam)) Q^T        [r, in]

and the corrected layer computes ``x (Wq + B A)^T``. ``C`` is exactly what :class:`moe.quant.Hessian`
accumulates for GPTQ (H = sum_i c_i x_i x_i^T), so EoRA reuses each linear's GPTQ Hessian: its own
AGQ-weighted rows for an expert, its own inputs for attention, shared experts and dense FFNs.

Numerics: the eigendecomposition and the SVD run in float64 on ``C / mean(diag(C))`` (the optimum
does not depend on the scale of C; normalising keeps A and B of moderate size). Eigenvalues below
``floor * max(lam)`` (default 1e-6) are raised to it: directions the calibration set never excites
(dead inputs, rank-deficient C) would otherwise divide by zero in A; raised, they stay directions
that cost almost nothing, so the SVD gives them no rank. With the floor the result is the exact
optimum for ``C + (floor-clamped part)``, i.e. for C up to a relative 1e-6. A and B are stored in
float16 (the compact artifact); :meth:`LowRankCorrection.delta` multiplies them in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from moe.errors import UserError
from moe.quant.gptq import Hessian

EIGEN_FLOOR = 1e-6
"""Relative floor of the covariance's eigenvalues (times the largest)."""
STORAGE_DTYPE = torch.float16


@dataclass
class LowRankCorrection:
    """``B A``, the rank-r EoRA correction of one linear ``[out, in]``: ``a [r, in]``, ``b [out, r]``."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LowRankCorrection: a [r, in] and b [out, r] expected, got {tuple(self.a.shape)} "
                             f"and {tuple(self.b.shape)}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """``B @ A`` as float32 ``[out, in]`` (what is added to the dequantized weight)."""
        return self.b.float() @ self.a.float()

    def to(self, device) -> "LowRankCorrection":
        return LowRankCorrection(self.a.to(device), self.b.to(device))


def check_rank(rank: int, out_features: int, in_features: int, what: str = "the linear") -> None:
    """A :class:`UserError` unless ``1 <= rank <= min(out_features, in_features)``."""
    limit = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise UserError(f"--eora {rank!r} is invalid: the rank must be an integer in 1..{limit} "
                        f"(min(out, in) of {what}, {out_features} x {in_features})")


def eora_factors(error: torch.Tensor, covariance: Union[torch.Tensor, Hessian], rank: int,
                 floor: float = EIGEN_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 factors ``(B [out, r], A [r, in])`` minimising ``||(error - B A) X^T||_F`` for the
    inputs ``X`` whose covariance ``X^T X`` is ``covariance [in, in]`` (module docstring).

    An all-zero covariance (a linear that saw no calibration row) gives zero factors."""
    error = error.detach().double()
    out_features, in_features = error.shape
    check_rank(rank, out_features, in_features)
    c = covariance.matrix if isinstance(covariance, Hessian) else covariance
    if tuple(c.shape) != (in_features, in_features):
        raise ValueError(f"eora: covariance has shape {tuple(c.shape)}; expected ({in_features}, {in_features})")
    c = c.detach().to(device=error.device, dtype=torch.float64)
    scale = torch.diagonal(c).mean()
    if not scale > 0:
        zeros = error.new_zeros
        return zeros(out_features, rank), zeros(rank, in_features)
    c = c / scale
    lam, q = torch.linalg.eigh((c + c.T) / 2)  # ascending eigenvalues, orthonormal columns q
    lam = lam.clamp_min(floor * float(lam.max()))
    root = lam.sqrt()  # [in]
    u, s, vh = torch.linalg.svd(error @ q * root, full_matrices=False)  # dW' = dW Q diag(sqrt(lam))
    b = u[:, :rank] * s[:rank]  # [out, r]
    a = (vh[:rank] / root) @ q.T  # [r, in]
    return b, a


def eora(weight: torch.Tensor, qweight: torch.Tensor, covariance: Union[torch.Tensor, Hessian], rank: int,
         floor: float = EIGEN_FLOOR) -> LowRankCorrection:
    """The EoRA correction of ``weight [out, in]`` quantized to ``qweight [out, in]`` (dequantized),
    for inputs with covariance ``covariance [in, in]`` (e.g. the linear's GPTQ :class:`Hessian`),
    its factors stored in float16."""
    if weight.shape != qweight.shape or weight.dim() != 2:
        raise ValueError(f"eora: weight {tuple(weight.shape)} and qweight {tuple(qweight.shape)} must be the same [out, in]")
    b, a = eora_factors(weight.double() - qweight.double(), covariance, rank, floor)
    return LowRankCorrection(a.to(STORAGE_DTYPE).contiguous(), b.to(STORAGE_DTYPE).contiguous())
