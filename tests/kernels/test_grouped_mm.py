"""kernels.grouped_mm: every backend against a per-row loop, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

import kernels


def _per_row_reference(x, w, counts):
    """Row by row: row i belongs to the expert whose range contains i."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.stack([x[i] @ w[expert_of_row[i]] for i in range(x.shape[0])]) if x.shape[0] else x.new_zeros(0, w.shape[2])


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize(
    "counts, k_dim, m_dim",
    [
        ([3, 0, 5, 1], 8, 12),  # aligned, with an empty expert
        ([0, 0, 7, 0], 8, 4),  # all rows on one expert
        ([2, 3, 1], 7, 5),  # odd sizes (the torch backend falls back to the loop)
        ([1], 4, 4),  # a single row
        ([0, 0], 4, 8),  # no rows at all
    ],
)
def test_grouped_mm_matches_per_row_loop(backend, counts, k_dim, m_dim):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), k_dim, requires_grad=True)
    w = torch.randn(len(counts), k_dim, m_dim, requires_grad=True)
    offsets = kernels.offsets_from_counts(torch.tensor(counts))
    assert offsets.dtype == torch.int32
    out = kernels.grouped_mm(x, w, offsets, backend=backend)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _per_row_reference(x_ref, w_ref, counts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if out.numel():
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
        empty = torch.tensor(counts) == 0
        assert torch.all(w.grad[empty] == 0)


def test_grouped_mm_rejects_bad_inputs():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="int32"):
        kernels.grouped_mm(x, w, torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="offsets must be \\[E=2\\]"):
        kernels.grouped_mm(x, w, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="K=8 columns but w has K=6"):
        kernels.grouped_mm(x, torch.randn(2, 6, 4), torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown backend 'cutlass'"):
        kernels.grouped_mm(x, w, torch.tensor([2, 4], dtype=torch.int32), backend="cutlass")
