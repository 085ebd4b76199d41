"""Grouped experts: E MLPs whose weights are stacked tensors, run over rows grouped by expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from moe.config import MoEConfig


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

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, d]`` grouped by expert with ``tokens_per_expert [E]`` rows each -> ``[N, d]``."""
        offsets = kernels.offsets_from_counts(tokens_per_expert)
        hidden = kernels.grouped_mm(x, self.w1, offsets, backend=self.backend)  # [N, f]
        if self.activation == "swiglu":
            hidden = F.silu(hidden) * kernels.grouped_mm(x, self.w3, offsets, backend=self.backend)
        elif self.activation == "gelu":
            hidden = F.gelu(hidden)
        else:
            hidden = F.relu(hidden)
        return kernels.grouped_mm(hidden, self.w2, offsets, backend=self.backend)  # [N, d]
