"""Dispatchers: decide which rows each local expert computes, and bring the results home.

``dispatch(x, routing)`` returns :class:`GroupedRows`: the rows the experts read (``source``), and
for every (token, choice) assignment kept, sorted by expert, the row it reads and writes
(``row_index``) and its gate weight (``row_weight``), and, when every source row has the same
number of assignments, where each source row's assignments went (``source_order``, the inverse of
the sort). The experts gather, compute, weight and scatter-add in one fused op
(``kernels.expert_mlp``), so no sorted copy of the tokens is ever made, and the sum at the source
rows needs no second sort. ``combine(out, state)`` turns the experts' output rows into ``y [T, d]``.

:class:`LocalDispatcher` (one device) reads and writes the layer's own token rows, so its
``combine`` has nothing left to do. ``parallel``'s all-to-all dispatcher implements the same
interface: its ``source`` is the rows received from other ranks, and its ``combine`` sends the
results back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

import kernels
from moe.routers import Routing


@dataclass
class GroupedRows:
    """The work of the local experts, grouped by expert without moving any row."""

    source: torch.Tensor
    """[M, d]: the rows the experts read (and whose positions their output takes)."""
    row_index: torch.Tensor
    """[N] int64: the source row of each assignment, sorted by expert (stable within one)."""
    row_weight: torch.Tensor
    """[N]: the gate weight of each assignment."""
    tokens_per_expert: torch.Tensor
    """[E_local] int64: assignments per local expert (sums to N)."""
    source_order: Optional[torch.Tensor] = None
    """[N] int64 or None: with r = N / M assignments per source row, source row m's are the grouped rows
    ``source_order[m*r : (m+1)*r]`` (``row_index[source_order[m*r + j]] == m``). None where rows have
    different numbers of assignments (capacity dropping)."""
    offsets: Optional[torch.Tensor] = None
    """[E_local] int32 or None: cumulative group ends (``kernels.offsets_from_counts(tokens_per_expert)``),
    where the grouping already produced them."""


class LocalDispatcher:
    """Sort the T * k assignments by expert, on one device."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[GroupedRows, Any]:
        return sort_by_expert(x, routing, self.num_experts), None

    def combine(self, out: torch.Tensor, state: Any) -> torch.Tensor:
        return out  # the experts already added each weighted result at its token's row


def sort_keys(ids: torch.Tensor, largest: int) -> torch.Tensor:
    """``ids`` (values in 0..largest) in the narrowest integer dtype that holds them: a radix sort
    (CUDA's) makes one pass per key byte, so uint8 keys take one pass where int64 take eight."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return ids.to(dtype)
    return ids


def argsort_by_expert(expert_ids: torch.Tensor, largest: int) -> torch.Tensor:
    """Stable argsort of ``expert_ids`` (values in 0..largest), int64 positions."""
    return torch.argsort(sort_keys(expert_ids, largest), stable=True)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse[order[i]] = i`` (one scatter, no sort)."""
    positions = torch.arange(order.shape[0], device=order.device, dtype=order.dtype)
    return torch.empty_like(order).scatter_(0, order, positions)


def sort_by_expert(x: torch.Tensor, routing: Routing, num_experts: int) -> GroupedRows:
    """Group the kept assignments of ``routing`` by expert (a stable sort keeps token order).

    Dropless routing on a GPU takes the Triton counting sort (``kernels.group_by_expert_triton``:
    three launches, the same grouping); capacity dropping, the CPU and more than
    ``kernels.triton_ops.GROUPING_MAX_EXPERTS`` experts (or ``SLIMMOE_ROUTING_KERNELS=0``) take an argsort."""
    if routing.kept is None and kernels.grouping_kernel_applies(routing.indices, num_experts):
        row_index, row_weight, source_order, offsets = kernels.group_by_expert_triton(
            routing.indices, routing.weights, num_experts)
        return GroupedRows(source=x, row_index=row_index, row_weight=row_weight,
                           tokens_per_expert=routing.tokens_per_expert, source_order=source_order, offsets=offsets)
    top_k = routing.indices.shape[1]
    expert_of_slot = routing.indices.flatten()  # [T*k]
    if routing.kept is not None:  # dropped slots sort past the last expert and are cut off
        expert_of_slot = expert_of_slot.masked_fill(~routing.kept.flatten(), num_experts)
    order = argsort_by_expert(expert_of_slot, num_experts)  # [T*k]
    source_order = None
    if routing.kept is not None:  # the one data-dependent size, only with capacity dropping
        order = order[: int(routing.tokens_per_expert.sum())]  # [N]
    else:  # slot t*k + j is token t's j-th choice: the inverse of the sort lists each token's k rows
        source_order = inverse_permutation(order)
    return GroupedRows(
        source=x,
        row_index=order // top_k,
        row_weight=routing.weights.flatten()[order],
        tokens_per_expert=routing.tokens_per_expert,
        source_order=source_order,
    )
