"""Routing metrics as plain tensors and dicts, for the trainer to log.

Load is the number of token assignments an expert was chosen for (its demand, before any capacity
dropping; in the dropless default it is also what the expert computes).

- MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024): 0 when perfectly balanced,
  E - 1 when every token goes to one expert (k = 1).
- load entropy = -sum_i p_i log p_i / log E with p_i = load_i / sum(load): 1 when balanced.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from moe.layer import MoELayer
from moe.routers import Routing


def max_violation(tokens_per_expert: torch.Tensor) -> float:
    load = tokens_per_expert.double()
    mean = load.mean()
    if mean <= 0:
        return 0.0
    return float((load.max() - mean) / mean)


def load_entropy(tokens_per_expert: torch.Tensor) -> float:
    load = tokens_per_expert.double()
    total = load.sum()
    if total <= 0 or load.numel() < 2:
        return 1.0
    p = load / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(entropy / math.log(load.numel()))


def routing_metrics(routing: Routing) -> dict:
    """MaxVio, load entropy, dropped fraction and the per-expert load of one routing decision."""
    return {
        "tokens_per_expert": routing.routed_per_expert.detach().cpu(),
        "max_vio": max_violation(routing.routed_per_expert),
        "load_entropy": load_entropy(routing.routed_per_expert),
        "dropped_fraction": routing.dropped_fraction,
    }


def moe_layers(module: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    """(name, layer) for every :class:`MoELayer` inside ``module`` (itself included)."""
    for name, sub in module.named_modules():
        if isinstance(sub, MoELayer):
            yield name or "moe", sub


def collect_routing_metrics(module: nn.Module) -> dict[str, dict]:
    """Per-layer :func:`routing_metrics` of each MoE layer's last forward."""
    return {name: routing_metrics(layer.last_routing) for name, layer in moe_layers(module) if layer.last_routing is not None}


class LoadMeter:
    """Accumulates each layer's load over many forwards (e.g. a validation set) for MaxVio_global.

    Call :meth:`update` after every forward of ``module``; :meth:`summary` gives per-layer and
    mean MaxVio over everything seen, next to the mean of the per-batch values (MaxVio_batch).
    """

    def __init__(self, module: nn.Module):
        self.layers = dict(moe_layers(module))
        if not self.layers:
            raise ValueError("LoadMeter: the module has no MoELayer")
        self.reset()

    def reset(self) -> None:
        self.load = {name: None for name in self.layers}
        self.batch_loads = {name: [] for name in self.layers}
        self.dropped = 0
        self.assignments = 0

    def update(self) -> None:
        """Add each layer's load of its last forward. The loads stay on the layers' device (no
        host sync per forward); only a capacity drop count is read back."""
        for name, layer in self.layers.items():
            routing = layer.last_routing
            if routing is None:
                continue
            load = routing.routed_per_expert.detach()
            self.load[name] = load.clone() if self.load[name] is None else self.load[name] + load
            self.batch_loads[name].append(load)
            if routing.kept is not None:
                self.dropped += routing.num_dropped
            self.assignments += routing.indices.numel()

    def stacked_load(self) -> torch.Tensor:
        """``[L, max E]`` float64 on the layers' device: each layer's load so far (zeros for a layer
        not seen yet, and past a layer's E when layers differ in E), ready to be summed over ranks
        with one all-reduce; :meth:`per_layer` takes the rows apart again."""
        device = next((load.device for load in self.load.values() if load is not None), None)
        widest = max(layer.num_experts for layer in self.layers.values())
        rows = [self.load[name].double() if self.load[name] is not None
                else torch.zeros(layer.num_experts, dtype=torch.float64, device=device)
                for name, layer in self.layers.items()]
        return torch.stack([torch.nn.functional.pad(row, (0, widest - row.numel())) for row in rows])

    def per_layer(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer name -> its ``[E]`` load, from a :meth:`stacked_load` (or its sum over ranks)."""
        return {name: row[: layer.num_experts] for (name, layer), row in zip(self.layers.items(), stacked)}

    def summary(self) -> dict:
        per_layer = {name: max_violation(load) for name, load in self.load.items() if load is not None}
        batch = {name: sum(max_violation(load) for load in v) / len(v) for name, v in self.batch_loads.items() if v}
        return {
            "max_vio_global": per_layer,
            "max_vio_global_mean": sum(per_layer.values()) / max(1, len(per_layer)),
            "max_vio_batch_mean": sum(batch.values()) / max(1, len(batch)),
            "load_entropy": {name: load_entropy(load) for name, load in self.load.items() if load is not None},
            "tokens_per_expert": {name: load.cpu() for name, load in self.load.items() if load is not None},
            "dropped_fraction": self.dropped / max(1, self.assignments),
        }
