"""The MoE feed-forward layer: router -> dispatcher -> grouped experts -> combine."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from moe.config import MoEConfig
from moe.dispatch import LocalDispatcher
from moe.errors import UserError
from moe.experts import DenseFFN, GroupedExperts
from moe.routers import Routing, TopKRouter
from moe.schedules import k_at_step


class MoELayer(nn.Module):
    """``y = layer(x)`` for ``x [..., d]``; the same shape comes back.

    After each forward, ``last_routing`` holds the (detached) routing of that call and
    ``aux_loss()`` the sum of the differentiable router losses the trainer adds.
    ``active_experts`` is the run-time k: set by the training schedule (``moe.advance_k_schedule``)
    or per deployment (``moe.set_active_experts``); nothing about it is stored in the weights.
    """

    def __init__(self, config: MoEConfig, layer_idx: int = 0, dispatcher=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.router = TopKRouter(config, layer_idx)
        self.experts = GroupedExperts(config)
        # Always active, never dispatched: ordinary (data-parallel) parameters under expert parallelism.
        self.shared_mlp = DenseFFN(config.hidden_size, config.shared_width) if config.num_shared_experts else None
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(config.num_experts)
        self.active_experts = k_at_step(config, 0)
        self.last_routing: Optional[Routing] = None
        self._losses: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def set_active_experts(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise UserError(
                f"active experts k={k!r} is invalid for layer {self.layer_idx}: expected an integer in 1..{self.num_experts}"
            )
        self.active_experts = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, d]
        routing = self.router(tokens, self.active_experts)  # fp32 gate weights
        # the one cast of the gate weights to the experts' dtype; the router's side stays fp32
        to_experts = dataclasses.replace(routing, weights=routing.weights.to(self.experts.w1.dtype))
        rows, state = self.dispatcher.dispatch(tokens, to_experts)
        out = self.dispatcher.combine(self.experts(rows), state)  # [T, d]
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(tokens)
        losses = [loss for loss in (routing.aux_loss, routing.z_loss, routing.mi_loss) if loss is not None]
        self._losses = sum(losses) if losses else None
        self.last_routing = routing.detached()
        return out.reshape(shape)

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the router losses of the last forward (Switch aux loss, z-loss, mutual-information
        loss; each already scaled by its coefficient), or None when none was computed."""
        return self._losses

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d={c.hidden_size}, f={c.ffn_hidden_size}, E={c.num_experts}, k={self.active_experts}, "
            f"router={c.router}, score={c.score_function}, balance={c.balance}, activation={c.activation}"
        )
