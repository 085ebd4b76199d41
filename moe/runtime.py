"""Operations on every MoE layer of a model: set k, advance the k schedule, move the expert
biases once per optimizer step, and gather the auxiliary losses."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.balance import updated_expert_bias
from moe.devices import on_collective_device
from moe.errors import UserError
from moe.metrics import moe_layers
from moe.schedules import bias_rate_at_update, k_at_step


def _layers_or_fail(module: nn.Module, what: str):
    layers = [layer for _, layer in moe_layers(module)]
    if not layers:
        raise UserError(f"{what}: {type(module).__name__} contains no MoELayer")
    return layers


def set_active_experts(module: nn.Module, k: Union[int, Sequence[int]]) -> None:
    """Set the run-time k on every MoE layer: one int for all, or a list with one k per layer
    (in module order). One int k may go up to the largest E of any layer, and a layer with fewer
    experts (a PR-MoE pyramid) runs all of its own; k < 1, a k above every layer's E, or a listed
    k above its layer's E raises ``ValueError`` naming the layer."""
    layers = _layers_or_fail(module, "set_active_experts")
    if isinstance(k, (list, tuple)):
        ks = list(k)
    else:
        most = max(layer.num_experts for layer in layers)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
            raise UserError(f"set_active_experts: k={k!r} is invalid: expected an integer in 1..{most} "
                            "(the number of experts)")
        ks = [min(k, layer.num_experts) for layer in layers]
    if len(ks) != len(layers):
        raise UserError(f"set_active_experts: got {len(ks)} values of k for {len(layers)} MoE layers")
    for layer, layer_k in zip(layers, ks):  # validate everything before changing anything
        if isinstance(layer_k, bool) or not isinstance(layer_k, int) or not 1 <= layer_k <= layer.num_experts:
            raise UserError(
                f"set_active_experts: k={layer_k!r} is invalid for MoE layer {layer.layer_idx}: "
                f"expected an integer in 1..{layer.num_experts} (its number of experts)"
            )
    for layer, layer_k in zip(layers, ks):
        layer.set_active_experts(layer_k)


def advance_k_schedule(module: nn.Module, step: int) -> list[int]:
    """Set each layer's k to its schedule's value at optimizer step ``step``; returns the ks."""
    layers = _layers_or_fail(module, "advance_k_schedule")
    for layer in layers:
        layer.set_active_experts(k_at_step(layer.config, step))
    return [layer.active_experts for layer in layers]


@torch.no_grad()
def update_expert_biases(module: nn.Module, group: Optional[dist.ProcessGroup] = None) -> Optional[torch.Tensor]:
    """One auxiliary-loss-free bias update for every bias-balanced layer; call once per optimizer
    step. The token counts accumulated since the last call (training-mode forwards only) are summed
    over ``group`` when given, with one all-reduce for all layers, then reset.

    Returns the ``[L, E]`` summed counts (rows in module order; with per-layer expert counts,
    ``[L, max E]`` with zeros past each layer's E), or None if no layer balances by bias.
    """
    routers = [layer.router for _, layer in moe_layers(module) if layer.router.expert_bias is not None]
    if not routers:
        return None
    widest = max(router.pending_tokens.numel() for router in routers)  # layers may differ in E (PR-MoE)
    counts = torch.stack([F.pad(router.pending_tokens, (0, widest - router.pending_tokens.numel()))
                          for router in routers])  # [L, max E], zeros past a layer's E
    if group is not None:
        counts = on_collective_device(counts, group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        counts = counts.to(routers[0].pending_tokens.device)
    for router, layer_counts in zip(routers, counts):
        layer_counts = layer_counts[: router.pending_tokens.numel()]
        # All on the device, no host sync: a layer that routed nothing keeps its bias and its count.
        cfg = router.config
        routed = layer_counts.sum() > 0
        rate = _bias_rate(cfg, router.bias_updates)
        updated = updated_expert_bias(router.expert_bias, layer_counts, rate, cfg.bias_update_mode)
        router.expert_bias.copy_(torch.where(routed, updated, router.expert_bias))
        router.bias_updates += routed
        router.pending_tokens.zero_()
    return counts


def _bias_rate(config, updates: torch.Tensor):
    """:func:`moe.schedules.bias_rate_at_update` at the update count ``updates`` (a device scalar),
    without reading it back: a float for the constant schedule, else a device fp32 scalar."""
    if config.bias_update_schedule == "constant":
        return bias_rate_at_update(config, 0)
    return (config.bias_update_rate / (1.0 + updates.double() / config.bias_update_t0)).float()


def collect_aux_losses(module: nn.Module) -> Optional[torch.Tensor]:
    """Sum of every MoE layer's auxiliary and z-losses from its last forward (None if there are
    none): add it to the task loss before ``backward``."""
    losses = [loss for _, layer in moe_layers(module) if (loss := layer.aux_loss()) is not None]
    return torch.stack(losses).sum() if losses else None
