"""Grouped experts: E MLPs whose weights are stacked tensors, run over rows grouped by expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from moe.config import MoEConfig
from moe.dispatch import GroupedRows


class GroupedExperts(nn.Module):
    """``w1 [E, d, f]``, ``w3 [E, d, f]`` (SwiGLU only), ``w2 [E, f, d]``; expert e maps a row x
    to ``act(x @ w1[e]) @ w2[e]`` (``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` for SwiGLU)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        num_experts, hidden, ffn = config.num_experts, config.hidden_size, config.ffn_hidden_size
        self.activation = config.activation
        self.backend = config.expert_backend
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, ffn)) if config.activation == "swiglu" else None
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def reset_parameters(self) -> None:
        # nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for weight in (self.w1, self.w3, self.w2):
            if weight is not None:
                bound = 1.0 / math.sqrt(weight.shape[1])
                nn.init.uniform_(weight, -bound, bound)

    def forward(self, rows: GroupedRows) -> torch.Tensor:
        """The weighted expert outputs, added at their source rows: ``[M, d]`` like ``rows.source``."""
        offsets = rows.offsets if rows.offsets is not None else kernels.offsets_from_counts(rows.tokens_per_expert)
        return kernels.expert_mlp(
            rows.source, rows.row_index, rows.row_weight, offsets, self.w1, self.w3, self.w2,
            activation=self.activation, backend=self.backend, source_order=rows.source_order,
        )


class DenseFFN(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``: the dense blocks' FFN and the MoE layer's shared experts."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
