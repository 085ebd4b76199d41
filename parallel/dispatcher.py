"""The all-to-all dispatcher: tokens travel to the ranks that hold their experts and back.

Same interface as :class:`moe.LocalDispatcher`, so the MoE layer does not know which it has:

    dispatch(x [T, d], routing) -> GroupedRows over the rows this rank received, state
    combine(expert_out [M, d], state) -> y [T, d]

1. The T*k kept assignments are sorted by global expert (``moe.dispatch.sort_by_expert``). Experts
   are laid out in contiguous blocks of E/P per rank, so the sorted rows are already grouped by
   destination rank.
2. Counts first: one all-to-all of the ``[P, E/P]`` per-(rank, local expert) counts tells every
   rank how many rows it will receive from each peer for each of its experts.
3. Tokens: ``all_to_all_single`` with uneven splits sends the gathered rows; autograd runs the
   reverse exchange in backward. Received rows arrive grouped by (source rank, local expert) and
   are grouped by local expert through an index, never copied.
4. The local experts compute each received row unweighted; ``combine`` sends the results back by
   the reverse exchange and adds them, times their gate weights, at their tokens' rows, so the
   gradient of the gate weights is taken where the router ran.

Dropless unless the layer's config sets a capacity factor, in which case the router has already
dropped the overflow of each expert (counted over this rank's tokens) before step 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe.devices import collective_device
from moe.dispatch import GroupedRows, sort_by_expert
from moe.errors import UserError
from moe.routers import Routing
from parallel.groups import ExpertParallelGroups


@dataclass
class ExchangeStats:
    """What the exchanges of one dispatcher moved since the last :meth:`reset`."""

    rows_sent: int = 0
    """Rows sent to other ranks (forward), excluding rows this rank kept for itself."""
    rows_received: int = 0
    """Rows received from other ranks (forward), excluding this rank's own."""
    bytes_sent: int = 0
    """Bytes of token rows sent to other ranks, forward and backward exchanges."""
    seconds: float = 0.0
    """Wall time inside all-to-all calls (counts and rows, forward and backward)."""
    calls: int = 0

    def reset(self) -> None:
        self.rows_sent = self.rows_received = self.bytes_sent = self.calls = 0
        self.seconds = 0.0


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits: list, input_splits: list, group, stats: ExchangeStats, me: int):
        ctx.group, ctx.splits, ctx.stats, ctx.me = group, (output_splits, input_splits), stats, me
        return _exchange(x, output_splits, input_splits, group, stats, me)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group, ctx.stats, ctx.me), None, None, None, None, None


def _exchange(x: torch.Tensor, output_splits: list, input_splits: list, group, stats: ExchangeStats, me: int):
    device = collective_device(group)  # x's own device under NCCL (CUDA) and gloo (CPU): no copy then
    out = x.new_empty((sum(output_splits), *x.shape[1:]), device=device)
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous().to(device), output_splits, input_splits, group=group)
    stats.seconds += time.perf_counter() - start
    out = out.to(x.device)
    stats.calls += 1
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    stats.bytes_sent += (sum(input_splits) - input_splits[me]) * row_bytes
    return out


@dataclass
class _Exchange:
    """What ``combine`` needs from ``dispatch``."""

    row_index: torch.Tensor
    """[N] the token row of each sent assignment (sorted by global expert)."""
    row_weight: torch.Tensor
    """[N] its gate weight."""
    send_splits: list = field(default_factory=list)
    recv_splits: list = field(default_factory=list)
    num_tokens: int = 0


class AllToAllDispatcher:
    """Expert-parallel dispatch over ``groups.group``: this rank holds experts
    ``[groups.rank * E/P, (groups.rank + 1) * E/P)``."""

    def __init__(self, num_experts: int, groups: ExpertParallelGroups):
        if num_experts % groups.size:
            raise UserError(
                f"parallel.expert_parallel_size={groups.size} is invalid: it must divide num_experts ({num_experts})"
            )
        self.num_experts = num_experts
        self.groups = groups
        self.num_local_experts = num_experts // groups.size
        self.stats = ExchangeStats()

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[GroupedRows, _Exchange]:
        ep, local, me = self.groups.size, self.num_local_experts, self.groups.rank
        by_expert = sort_by_expert(x, routing, self.num_experts)
        device = collective_device(self.groups.group)
        send_counts = by_expert.tokens_per_expert.view(ep, local).to(device)  # [P, E/P]: rows for each rank's experts
        recv_counts = torch.empty_like(send_counts)  # [P, E/P]: rows from each rank for my experts
        start = time.perf_counter()
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.groups.group)
        self.stats.seconds += time.perf_counter() - start
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        self.stats.rows_sent += sum(send_splits) - send_splits[me]
        self.stats.rows_received += sum(recv_splits) - recv_splits[me]

        sent = x.index_select(0, by_expert.row_index)  # [N, d], grouped by destination rank
        received = _AllToAll.apply(sent, recv_splits, send_splits, self.groups.group, self.stats, me)  # [M, d]
        # received rows are grouped by (source rank, local expert); group them by local expert
        local_expert = torch.arange(local, device=x.device).repeat(ep)  # [P * E/P]
        expert_of_row = torch.repeat_interleave(local_expert, recv_counts.flatten().to(x.device))  # [M]
        order = torch.argsort(expert_of_row, stable=True)
        rows = GroupedRows(
            source=received,
            row_index=order,
            row_weight=torch.ones(received.shape[0], dtype=routing.weights.dtype, device=x.device),
            tokens_per_expert=recv_counts.sum(0).to(x.device),
        )
        state = _Exchange(by_expert.row_index, by_expert.row_weight, send_splits, recv_splits, x.shape[0])
        return rows, state

    def combine(self, out: torch.Tensor, state: _Exchange) -> torch.Tensor:
        """``out [M, d]``: each received row's expert output. Returns ``y [T, d]``."""
        back = _AllToAll.apply(out, state.send_splits, state.recv_splits, self.groups.group, self.stats, self.groups.rank)
        weighted = back * state.row_weight.unsqueeze(1).to(back.dtype)  # [N, d]
        y = out.new_zeros((state.num_tokens, out.shape[1]))
        return y.index_add(0, state.row_index, weighted)
