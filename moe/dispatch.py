"""Dispatchers: move token copies to their experts and the results back.

``dispatch`` turns ``x [T, d]`` and a :class:`~moe.routers.Routing` into the rows each local expert
computes, grouped by expert (``[N, d]``, N = kept assignments) plus ``tokens_per_local_expert``;
``combine`` takes the experts' ``[N, d]`` output back to ``[T, d]`` as the routing-weighted sum
over each token's k choices. :class:`LocalDispatcher` does this on one device;
``parallel.AllToAllDispatcher`` adds the exchange between ranks behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.routers import Routing


@dataclass
class DispatchState:
    """What ``combine`` needs from ``dispatch``."""

    source_token: torch.Tensor
    """[N] int64: the token row each grouped row came from."""
    weight: torch.Tensor
    """[N] fp32: the gate weight of each grouped row."""
    num_tokens: int


class LocalDispatcher:
    """Sort the T * k assignments by expert (stable, so token order is kept within an expert)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        top_k = routing.indices.shape[1]
        expert_of_slot = routing.indices.flatten()  # [T*k]
        if routing.kept is not None:  # dropped slots sort past the last expert and are cut off
            expert_of_slot = expert_of_slot.masked_fill(~routing.kept.flatten(), self.num_experts)
        order = torch.argsort(expert_of_slot, stable=True)
        num_kept = int(routing.tokens_per_expert.sum())
        order = order[:num_kept]  # [N]
        source_token = order // top_k
        state = DispatchState(source_token, routing.weights.flatten()[order], x.shape[0])
        return x[source_token], routing.tokens_per_expert, state  # [N, d], [E]

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        weighted = y * state.weight.to(y.dtype).unsqueeze(1)  # [N, d]
        out = y.new_zeros(state.num_tokens, y.shape[1])
        return out.index_add(0, state.source_token, weighted)  # [T, d]
