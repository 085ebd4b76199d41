"""moe.quant.eora: EoRA's rank-r correction against a direct whitening computation, its effect on
the output error, its storage next to the packed weights, and the rank checks."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import UserError
from moe.quant import Hessian, QuantSpec, eora, eora_factors, gptq, rtn
from moe.quant.storage import dequantize_state, quantized_state


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, d: int, seed: int, rows_seed: int | None = None) -> torch.Tensor:
    """``[n, d]`` rows with correlated features and a spread of scales: x = z A, A = diag(1 .. 0.03)
    times a random rotation drawn from ``seed``, the rows z from ``rows_seed`` (default: the same
    generator, after A)."""
    g = _gen(seed)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    mixing = torch.logspace(0, -1.5, d).unsqueeze(1) * rotation
    return torch.randn(n, d, generator=g if rows_seed is None else _gen(rows_seed)) @ mixing


def output_error(error: torch.Tensor, x: torch.Tensor) -> float:
    """``||x error^T||_F`` in float64: the output error of a weight error ``[out, in]`` on rows ``x``."""
    return float(torch.linalg.matrix_norm(x.double() @ error.double().T))


def whitened_optimum(error: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` M for min ||(error - M) x^T||_F, by another route than EoRA's: the QR
    factor R of x itself (x = Q R, so ||M x^T|| = ||M R^T||), the truncated SVD of error R^T, and
    back through R^-T. Needs x of full column rank. float64 ``[out, in]``."""
    r = torch.linalg.qr(x.double(), mode="r").R  # [in, in], upper triangular
    whitened = error.double() @ r.T
    u, s, vh = torch.linalg.svd(whitened)
    truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return torch.linalg.solve_triangular(r, truncated.T, upper=True).T  # truncated @ R^-T


def test_eora_lowers_the_output_error_and_more_rank_lowers_it_further():
    out_features, in_features = 24, 32
    w = torch.randn(out_features, in_features, generator=_gen(1))
    x = correlated_inputs(512, in_features, seed=2)
    h = Hessian(in_features).add(x)
    wq = gptq(w, h, QuantSpec(bits=3)).dequantize()
    before = output_error(w - wq, x)
    errors = []
    for rank in (1, 2, 4, 8, 16, 24):
        correction = eora(w, wq, h, rank)
        assert correction.a.shape == (rank, in_features) and correction.b.shape == (out_features, rank)
        errors.append(output_error(w - wq - correction.delta(), x))
    assert errors[0] < before
    assert all(later <= earlier * (1 + 1e-3) for earlier, later in zip(errors, errors[1:])), errors  # fp16 factors
    assert errors[-1] < 0.01 * before  # full rank: the error is gone, up to the fp16 storage of A and B
    # on inputs it was not fitted to, from the same distribution, it helps as well
    held_out = correlated_inputs(256, in_features, seed=2, rows_seed=3)
    assert output_error(w - wq - eora(w, wq, h, 8).delta(), held_out) < output_error(w - wq, held_out)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_eora_equals_the_whitened_optimum(rank):
    """B A (EoRA's eigendecomposition of X^T X) equals the optimum found from a QR of X itself."""
    out_features, in_features = 10, 12
    error = torch.randn(out_features, in_features, generator=_gen(rank), dtype=torch.float64)
    x = correlated_inputs(200, in_features, seed=10 + rank).double()
    spread = torch.linalg.eigvalsh(x.T @ x)
    assert spread[0] > 1e-5 * spread[-1]  # above EoRA's eigenvalue floor: the exact optimum is expected
    b, a = eora_factors(error, x.T @ x, rank)
    expected = whitened_optimum(error, x, rank)
    assert torch.allclose(b @ a, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
    # the same through a Hessian accumulated by AGQ-weighted rows: c_i x_i x_i^T is (sqrt(c) x)(sqrt(c) x)^T
    c = torch.rand(200, generator=_gen(5), dtype=torch.float64) + 0.1
    b, a = eora_factors(error, Hessian(in_features).add(x, weight=c), rank)
    expected = whitened_optimum(error, x * c.sqrt().unsqueeze(1), rank)
    assert torch.allclose(b @ a, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
    assert torch.linalg.matrix_rank(b @ a) == rank


def test_rank_deficient_and_empty_activations():
    """Directions the calibration rows never reach get no correction (the eigenvalue floor), and a
    linear that saw no row gets a zero one."""
    error = torch.randn(6, 8, generator=_gen(0), dtype=torch.float64)
    x = torch.zeros(50, 8, dtype=torch.float64)
    x[:, :4] = torch.randn(50, 4, generator=_gen(1), dtype=torch.float64)  # inputs 4..7 never active
    b, a = eora_factors(error, x.T @ x, 4)
    assert torch.isfinite(b @ a).all()
    assert output_error(error - b @ a, x) < 1e-6 * output_error(error, x)  # rank 4 covers the 4 live inputs
    b, a = eora_factors(error, torch.zeros(8, 8, dtype=torch.float64), 2)
    assert not (b @ a).any()


def test_rank_errors():
    w = torch.randn(6, 8)
    for rank in (0, -1, 7, 2.5, True):
        with pytest.raises(UserError, match=r"--eora .* is invalid: the rank must be an integer in 1\.\.6"):
            eora(w, w.round(), torch.eye(8), rank)
    with pytest.raises(ValueError, match="covariance has shape"):
        eora(w, w.round(), torch.eye(6), 2)


def test_corrections_are_stored_beside_the_packed_weight_and_folded_in_on_loading():
    """A plain linear and a stacked expert tensor with EoRA: packed, stored float16 [(E,) r, in] and
    [(E,) out, r], and turned back into dequant + B A in the parameter's own layout."""
    spec = QuantSpec(bits=3)
    linear, experts = torch.randn(12, 16), torch.randn(3, 16, 12)  # experts [E, d, f]: linear e is experts[e].T
    x = correlated_inputs(128, 16, seed=4)
    h = Hessian(16).add(x)
    solved_linear = rtn(linear, spec)
    solved_linear.eora = eora(linear, solved_linear.dequantize(), h, 4)
    parts = []
    for e in range(3):
        part = rtn(experts[e].T, spec)
        part.eora = eora(experts[e].T, part.dequantize(), Hessian(16).add(x[e::3]), 4)
        parts.append(part)
    state, entries = quantized_state({"lin": linear, "exp": experts}, {"lin": solved_linear, "exp": parts})
    assert entries["lin"]["eora_rank"] == 4 and entries["exp"]["eora_rank"] == 4
    assert state["lin.eora_a"].shape == (4, 16) and state["lin.eora_b"].shape == (12, 4)
    assert state["exp.eora_a"].shape == (3, 4, 16) and state["exp.eora_b"].shape == (3, 12, 4)
    assert state["exp.eora_a"].dtype == torch.float16
    meta = {"format": "slimmoe-q1", "spec": spec.to_dict(), "tensors": entries}
    loaded = dequantize_state(state, meta)
    assert set(loaded) == {"lin", "exp"}
    fold = solved_linear.dequantize() + state["lin.eora_b"].float() @ state["lin.eora_a"].float()
    assert torch.equal(loaded["lin"], fold)
    for e in range(3):
        fold = parts[e].dequantize() + state["exp.eora_b"][e].float() @ state["exp.eora_a"][e].float()
        assert torch.equal(loaded["exp"][e], fold.T)
    assert output_error(linear - loaded["lin"], x) < output_error(linear - solved_linear.dequantize(), x)
    with pytest.raises(UserError, match="lacks its 'lin.eora_b' tensor"):
        dequantize_state({k: v for k, v in state.items() if k != "lin.eora_b"}, meta)
    bad = dict(state, **{"lin.eora_a": state["lin.eora_a"][:3]})
    with pytest.raises(UserError, match=r"lin\.eora_a is torch.float16 \(3, 16\)"):
        dequantize_state(bad, meta)
    with pytest.raises(UserError, match="eora_rank=13 is invalid"):
        dequantize_state(state, {**meta, "tensors": {**entries, "lin": {**entries["lin"], "eora_rank": 13}}})


def test_eora_factors_scale_free():
    """The correction does not depend on the scale of the covariance (it is normalised first)."""
    error = torch.randn(5, 7, generator=_gen(3), dtype=torch.float64)
    x = correlated_inputs(64, 7, seed=6).double()
    b1, a1 = eora_factors(error, x.T @ x, 3)
    b2, a2 = eora_factors(error, 1e6 * (x.T @ x), 3)
    assert torch.allclose(b1 @ a1, b2 @ a2, rtol=1e-9, atol=1e-12)
    assert math.isfinite(float(a1.abs().max()))
