"""Expert parallelism applied to a built model, the way torchtitan parallelizes after building:
each MoE layer keeps its rank's slice of ``w1/w3/w2``, its expert parameters are marked as
DeepSpeed MoE parameters, and its dispatcher becomes the all-to-all one (which runs the experts
itself, chunk by chunk beside the exchange, when ``model.moe.a2a_overlap_chunks`` > 1).

Router weights (learned or fixed random) and expert biases are untouched: they stay whole and
identical on every rank. Build the model from the same seed on every rank, then apply this; the
result computes what the unsliced model computes on the union of the ranks' tokens.
"""

from __future__ import annotations

from torch import nn

from moe.metrics import moe_layers
from parallel.dispatcher import AllToAllDispatcher
from parallel.groups import ExpertParallelGroups

EXPERT_WEIGHTS = ("w1", "w3", "w2")


def mark_expert_parameter(param: nn.Parameter, groups: ExpertParallelGroups) -> None:
    """DeepSpeed's marks for an MoE parameter: not all-reduced over all ranks, but over the
    expert-data-parallel group named ``group_name`` (``deepspeed.moe.utils.is_moe_param``)."""
    param.allreduce = False
    param.group_name = groups.name


def is_expert_parameter(param: nn.Parameter) -> bool:
    return getattr(param, "allreduce", True) is False


def apply_expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """Slice every MoE layer of ``model`` to this rank's experts, in place; returns ``model``."""
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError(f"apply_expert_parallel: {type(model).__name__} contains no MoELayer")
    for name, layer in layers:
        # checks that P divides E; with model.moe.a2a_overlap_chunks > 1 it runs the experts chunk by chunk
        dispatcher = AllToAllDispatcher(layer.num_experts, groups, overlap_chunks=layer.config.a2a_overlap_chunks,
                                        experts=layer.experts)
        if layer.experts.num_experts != layer.num_experts:
            raise ValueError(f"apply_expert_parallel: {name} is already expert-parallel")
        first = groups.rank * dispatcher.num_local_experts
        last = first + dispatcher.num_local_experts
        for weight_name in EXPERT_WEIGHTS:
            weight = getattr(layer.experts, weight_name)
            if weight is None:
                continue
            local = nn.Parameter(weight.detach()[first:last].clone(), requires_grad=weight.requires_grad)
            mark_expert_parameter(local, groups)
            setattr(layer.experts, weight_name, local)
        layer.dispatcher = dispatcher
        layer.expert_range = (first, last)
    return model


def exchange_stats(model: nn.Module) -> dict:
    """Summed :class:`~parallel.dispatcher.ExchangeStats` of every all-to-all dispatcher, then reset."""
    total = {"rows_sent": 0, "rows_received": 0, "bytes_sent": 0, "seconds": 0.0, "blocked_seconds": 0.0,
             "wait_seconds": 0.0, "calls": 0}
    for _, layer in moe_layers(model):
        stats = getattr(layer.dispatcher, "stats", None)
        if stats is None:
            continue
        for key in total:
            total[key] += getattr(stats, key)
        stats.reset()
    return total


def line_up_exchanges(model: nn.Module, on: bool = True) -> None:
    """Measurement only: every all-to-all dispatcher of ``model`` lines its ranks up with a barrier
    before each serial exchange (:attr:`~parallel.dispatcher.ExchangeStats.line_up`), so the exchange
    time it counts leaves out the waiting for the slowest rank."""
    for _, layer in moe_layers(model):
        stats = getattr(layer.dispatcher, "stats", None)
        if stats is not None:
            stats.line_up = on
