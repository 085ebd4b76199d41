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

Overlap (``MoEConfig.a2a_overlap_chunks`` = n > 1): steps 3 and 4 run as a pipeline of n chunks,
each a contiguous range of local experts (the same range on every rank), in :class:`_Overlapped`.
The counts are exchanged once, as above; then the dispatch all-to-all of chunk c + 1 is in flight
while the experts compute chunk c, and the combine all-to-all of chunk c while they compute c + 1.
Backward mirrors it: the gradient of chunk c + 1's combine travels while chunk c's expert backward
runs, and chunk c's input gradient travels back while chunk c + 1's runs. Chunking by expert keeps
every expert's rows, their order and its GEMM shapes those of the serial path, each weight gradient
is computed whole in one chunk (the other chunks add exact zeros), and the rows are put back in the
serial order before anything sums them. So outputs and gradients equal the serial path's bitwise
wherever the expert kernel computes an expert regardless of where its rows sit in memory: the CPU
kernel does under ``MKL_CBWR=COMPATIBLE``, and whenever rows are whole multiples of 64 bytes; MKL's
GEMMs otherwise take alignment-dependent paths, a few ulps apart (tests/parallel/test_overlap.py;
``moe bench ep`` prints the difference it measures).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.devices import collective_device
from moe.dispatch import GroupedRows, argsort_by_expert, inverse_permutation, sort_by_expert
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
    """Wall time during which an all-to-all was under way (counts and rows, forward and backward):
    inside blocking calls, and from issue to completion of overlapped ones (the union of those spans;
    under NCCL the host sees a launch, not the transfer)."""
    blocked_seconds: float = 0.0
    """Wall time the calling thread was blocked by all-to-all: inside blocking calls, and issuing and
    waiting on overlapped ones. Equals ``seconds`` on the serial path; the rest of ``seconds`` was
    hidden behind expert compute."""
    calls: int = 0
    line_up: bool = False
    """Measurement only: before each serial exchange, a barrier over the group lines the ranks up,
    so that ``seconds`` holds the exchange itself and ``wait_seconds`` the waiting for the slowest
    rank (which otherwise falls inside the exchange). Off in training: it adds a collective."""
    wait_seconds: float = 0.0
    """With ``line_up``: time spent in those barriers."""

    def reset(self) -> None:
        """Zero the counters (``line_up`` stays as it is)."""
        self.rows_sent = self.rows_received = self.bytes_sent = self.calls = 0
        self.seconds = self.blocked_seconds = self.wait_seconds = 0.0


def _line_up(group, stats: ExchangeStats) -> None:
    if stats.line_up:
        start = time.perf_counter()
        dist.barrier(group=group)
        stats.wait_seconds += time.perf_counter() - start


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
    _line_up(group, stats)
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous().to(device), output_splits, input_splits, group=group)
    elapsed = time.perf_counter() - start
    stats.seconds += elapsed
    stats.blocked_seconds += elapsed
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
    back: Optional[torch.Tensor] = None
    """[N, d] with overlap: the expert outputs of the sent rows, already home (same order)."""
    source_order: Optional[torch.Tensor] = None
    """[T*k] dropless only: token t's k sent rows are ``source_order[t*k : (t+1)*k]``."""


class AllToAllDispatcher:
    """Expert-parallel dispatch over ``groups.group``: this rank holds experts
    ``[groups.rank * E/P, (groups.rank + 1) * E/P)``.

    ``overlap_chunks`` > 1 (at most E/P are used) pipelines the exchange with the expert compute;
    ``dispatch`` then runs ``experts`` (the layer's module of this rank's experts) itself and hands
    the layer an empty :class:`GroupedRows`, and ``combine`` only weights and adds the results."""

    def __init__(self, num_experts: int, groups: ExpertParallelGroups, overlap_chunks: int = 1,
                 experts: Optional[nn.Module] = None):
        if num_experts % groups.size:
            raise UserError(
                f"parallel.expert_parallel_size={groups.size} is invalid: it must divide num_experts ({num_experts})"
            )
        if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int) or overlap_chunks < 1:
            raise UserError(f"model.moe.a2a_overlap_chunks={overlap_chunks!r} is invalid: expected an integer >= 1")
        if overlap_chunks > 1 and experts is None:
            raise ValueError("AllToAllDispatcher: overlap_chunks > 1 needs the experts module it runs")
        self.num_experts = num_experts
        self.groups = groups
        self.num_local_experts = num_experts // groups.size
        self.overlap_chunks = overlap_chunks
        self.experts = experts
        self.stats = ExchangeStats()

    @property
    def chunks(self) -> int:
        """Chunks the exchange is split into: 1 (serial) on one rank, else ``overlap_chunks`` up to E/P."""
        return 1 if self.groups.size == 1 else min(self.overlap_chunks, self.num_local_experts)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[GroupedRows, _Exchange]:
        ep, local, me = self.groups.size, self.num_local_experts, self.groups.rank
        by_expert = sort_by_expert(x, routing, self.num_experts)
        device = collective_device(self.groups.group)
        send_counts = by_expert.tokens_per_expert.view(ep, local).to(device)  # [P, E/P]: rows for each rank's experts
        recv_counts = torch.empty_like(send_counts)  # [P, E/P]: rows from each rank for my experts
        _line_up(self.groups.group, self.stats)
        start = time.perf_counter()
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.groups.group)
        elapsed = time.perf_counter() - start
        self.stats.seconds += elapsed
        self.stats.blocked_seconds += elapsed
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        self.stats.rows_sent += sum(send_splits) - send_splits[me]
        self.stats.rows_received += sum(recv_splits) - recv_splits[me]

        sent = x.index_select(0, by_expert.row_index)  # [N, d], grouped by destination rank
        state = _Exchange(by_expert.row_index, by_expert.row_weight, send_splits, recv_splits, x.shape[0],
                          source_order=by_expert.source_order)
        if self.chunks > 1:
            send_list, recv_list = torch.stack([send_counts, recv_counts]).tolist()
            plan = _Plan(send_list, recv_list, self.chunks, self.groups.group, self.stats, me, device,
                         routing.weights.dtype)
            state.back = _run_overlapped(sent, plan, self.experts)
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            rows = GroupedRows(source=x[:0], row_index=empty, row_weight=routing.weights.new_zeros(0),
                               tokens_per_expert=torch.zeros(local, dtype=torch.long, device=x.device))
            return rows, state  # the layer's expert call on no rows is a no-op

        received = _AllToAll.apply(sent, recv_splits, send_splits, self.groups.group, self.stats, me)  # [M, d]
        # received rows are grouped by (source rank, local expert); group them by local expert
        local_expert = torch.arange(local, device=x.device).repeat(ep)  # [P * E/P]
        expert_of_row = torch.repeat_interleave(local_expert, recv_counts.flatten().to(x.device),
                                                output_size=sum(recv_splits))  # [M]; the size known: no device sync
        order = argsort_by_expert(expert_of_row, local - 1)
        rows = GroupedRows(
            source=received,
            row_index=order,
            row_weight=torch.ones(received.shape[0], dtype=routing.weights.dtype, device=x.device),
            tokens_per_expert=recv_counts.sum(0).to(x.device),
            source_order=inverse_permutation(order),  # one grouped row per received row
        )
        return rows, state

    def combine(self, out: torch.Tensor, state: _Exchange) -> torch.Tensor:
        """``out [M, d]``: each received row's expert output (nothing with overlap). Returns ``y [T, d]``."""
        if state.back is not None:
            back = state.back
        else:
            back = _AllToAll.apply(out, state.send_splits, state.recv_splits, self.groups.group, self.stats,
                                   self.groups.rank)
        weighted = back * state.row_weight.unsqueeze(1).to(back.dtype)  # [N, d]
        if state.source_order is not None and state.num_tokens:  # each token's k rows, summed in a fixed order
            per_token = weighted.index_select(0, state.source_order)
            return per_token.view(state.num_tokens, -1, back.shape[1]).sum(1)
        y = back.new_zeros((state.num_tokens, back.shape[1]))
        return y.index_add(0, state.row_index, weighted)


# ----------------------------------------------------------------------------- overlap


class _Plan:
    """The chunks of one layer call, from the exchanged counts (host lists, no further sync).

    Chunk c holds local experts ``[bounds[c], bounds[c+1])`` on every rank. The sent rows (serial
    order: by destination rank, then expert, then token) are re-ordered chunk-major (chunk, rank,
    expert, token) so each chunk's rows are one contiguous slice; received rows arrive chunk-major too
    (chunk, source rank, expert, token).
    """

    def __init__(self, send_counts: list, recv_counts: list, chunks: int, group, stats: ExchangeStats, me: int,
                 device: torch.device, weight_dtype: torch.dtype):
        ep, local = len(send_counts), len(send_counts[0])
        self.group, self.stats, self.me, self.device, self.weight_dtype = group, stats, me, device, weight_dtype
        self.local = local
        self.bounds = [c * local // chunks for c in range(chunks + 1)]
        ranges = self.ranges = list(zip(self.bounds[:-1], self.bounds[1:]))
        self.send_splits = [[sum(row[a:b]) for row in send_counts] for a, b in ranges]  # [chunk][rank]
        self.recv_splits = [[sum(row[a:b]) for row in recv_counts] for a, b in ranges]
        self.recv_counts = recv_counts
        dest_start = [sum(sum(row) for row in send_counts[:p]) for p in range(ep)]
        self.send_ranges = [(dest_start[p] + sum(send_counts[p][:a]), dest_start[p] + sum(send_counts[p][:b]))
                            for a, b in ranges for p in range(ep)]

    @property
    def chunks(self) -> int:
        return len(self.ranges)

    def send_perm(self, device) -> torch.Tensor:
        """[N]: the serial-order position of each chunk-major sent row."""
        parts = [torch.arange(start, end, device=device) for start, end in self.send_ranges]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def send_slice(self, c: int) -> slice:
        start = sum(map(sum, self.send_splits[:c]))
        return slice(start, start + sum(self.send_splits[c]))

    def recv_slice(self, c: int) -> slice:
        start = sum(map(sum, self.recv_splits[:c]))
        return slice(start, start + sum(self.recv_splits[c]))

    def rows(self, c: int, source: torch.Tensor) -> GroupedRows:
        """Chunk c's received rows ``source [M_c, d]`` grouped by local expert (source rank, then token
        order within one, as the serial path groups them)."""
        a, b = self.ranges[c]
        device = source.device
        counts = torch.tensor([row[a:b] for row in self.recv_counts], dtype=torch.long, device=device)  # [P, b-a]
        expert_of_row = torch.repeat_interleave(torch.arange(a, b, device=device).repeat(counts.shape[0]),
                                                counts.flatten(), output_size=source.shape[0])  # [M_c]
        tokens_per_expert = torch.zeros(self.local, dtype=torch.long, device=device)
        tokens_per_expert[a:b] = counts.sum(0)
        order = argsort_by_expert(expert_of_row, self.local - 1)
        return GroupedRows(source=source, row_index=order,
                           row_weight=torch.ones(source.shape[0], dtype=self.weight_dtype, device=device),
                           tokens_per_expert=tokens_per_expert, source_order=inverse_permutation(order))

    def start(self, out: torch.Tensor, x: torch.Tensor, output_splits: list, input_splits: list) -> "_Pending":
        return _Pending(out, x, output_splits, input_splits, self)


class _Pending:
    """One asynchronous ``all_to_all_single``; ``wait()`` before reading its output."""

    def __init__(self, out: torch.Tensor, x: torch.Tensor, output_splits: list, input_splits: list, plan: _Plan):
        stats = self.stats = plan.stats
        self.issued = time.perf_counter()
        self.work = dist.all_to_all_single(out, x, output_splits, input_splits, group=plan.group, async_op=True)
        self.done = self.work.get_future().then(lambda _: time.perf_counter())  # completion time, on gloo's thread
        stats.blocked_seconds += time.perf_counter() - self.issued
        stats.calls += 1
        stats.bytes_sent += (sum(input_splits) - input_splits[plan.me]) * math.prod(x.shape[1:]) * x.element_size()

    def wait(self) -> None:
        start = time.perf_counter()
        self.work.wait()
        self.stats.blocked_seconds += time.perf_counter() - start


def _account(pending: list) -> None:
    """Add the union of the spans during which ``pending`` (all waited on) were in flight."""
    spans = sorted((p.issued, p.done.wait()) for p in pending)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    pending[0].stats.seconds += total


class _Overlapped(torch.autograd.Function):
    """``sent [N, d]`` (serial order) -> ``back [N, d]``: the local-expert outputs of those rows after
    the trip out and home, one chunk of experts at a time (see the module docstring).

    Forward: issue dispatch 0, then per chunk c: wait dispatch c, issue dispatch c + 1, run the experts
    on chunk c, issue combine c; wait the combines. Every rank issues the same collectives in the same
    order (zero-row chunks included), so they match. The experts run on detached aliases of their
    parameters (``torch.func.functional_call``) under ``enable_grad``; each chunk's small graph is kept.
    Backward: issue the reverse combine of chunk 0, then per chunk c: wait it, issue the reverse
    combine of c + 1, ``autograd.grad`` through chunk c's graph, issue the reverse dispatch of its
    input gradient; wait those. Parameter gradients are the sum over chunks (each expert's is nonzero
    in one chunk only), handed to autograd once, so gradient hooks on the parameters fire as usual.
    """

    @staticmethod
    def forward(ctx, sent, plan: _Plan, experts: nn.Module, track: bool, names: tuple, *params):
        home, dev = sent.device, plan.device
        perm = plan.send_perm(home)
        send = sent.index_select(0, perm).to(dev)  # [N, d] chunk-major
        recv = sent.new_empty((sum(map(sum, plan.recv_splits)), *sent.shape[1:]), device=dev)  # [M, d] chunk-major
        back = torch.empty_like(send)
        aliases = {name: p.detach().requires_grad_(p.requires_grad) for name, p in zip(names, params)}
        graphs, dispatches, combines = [], [], []
        dispatches.append(plan.start(recv[plan.recv_slice(0)], send[plan.send_slice(0)], plan.recv_splits[0],
                                     plan.send_splits[0]))
        for c in range(plan.chunks):
            dispatches[c].wait()  # then the next chunk's rows travel alone (gloo runs issued work side by side)
            if c + 1 < plan.chunks:
                dispatches.append(plan.start(recv[plan.recv_slice(c + 1)], send[plan.send_slice(c + 1)],
                                             plan.recv_splits[c + 1], plan.send_splits[c + 1]))
            rows_in = recv[plan.recv_slice(c)].to(home)
            with torch.set_grad_enabled(track):
                if track:
                    rows_in = rows_in.detach().requires_grad_()
                out = torch.func.functional_call(experts, aliases, (plan.rows(c, rows_in),))  # [M_c, d]
            if track:
                graphs.append((rows_in, out))
            combines.append(plan.start(back[plan.send_slice(c)], out.detach().to(dev).contiguous(),
                                       plan.send_splits[c], plan.recv_splits[c]))
        for pending in combines:
            pending.wait()
        _account(dispatches + combines)
        ctx.plan, ctx.graphs, ctx.aliases, ctx.perm = plan, graphs, [aliases[n] for n in names], perm
        result = torch.empty_like(back).index_copy_(0, perm.to(dev), back)  # serial order
        return result.to(home)

    @staticmethod
    def backward(ctx, grad_back):
        plan, perm = ctx.plan, ctx.perm
        home, dev = grad_back.device, plan.device
        grad_send = grad_back.index_select(0, perm).to(dev).contiguous()  # [N, d] chunk-major
        grad_out = grad_send.new_empty((sum(map(sum, plan.recv_splits)), *grad_send.shape[1:]))  # [M, d]
        grad_sent = torch.empty_like(grad_send)
        wanted = [i for i, alias in enumerate(ctx.aliases) if alias.requires_grad and ctx.needs_input_grad[5 + i]]
        param_grads = [None] * len(ctx.aliases)
        returns, reverse_dispatches = [], []
        returns.append(plan.start(grad_out[plan.recv_slice(0)], grad_send[plan.send_slice(0)], plan.recv_splits[0],
                                  plan.send_splits[0]))
        for c in range(plan.chunks):
            returns[c].wait()
            if c + 1 < plan.chunks:
                returns.append(plan.start(grad_out[plan.recv_slice(c + 1)], grad_send[plan.send_slice(c + 1)],
                                          plan.recv_splits[c + 1], plan.send_splits[c + 1]))
            rows_in, out = ctx.graphs[c]
            grads = torch.autograd.grad(out, [rows_in, *(ctx.aliases[i] for i in wanted)],
                                        grad_out[plan.recv_slice(c)].to(home), allow_unused=True)
            for i, grad in zip(wanted, grads[1:]):
                if grad is None:
                    continue
                param_grads[i] = grad if param_grads[i] is None else param_grads[i] + grad
            grad_in = grads[0] if grads[0] is not None else torch.zeros_like(rows_in)
            reverse_dispatches.append(plan.start(grad_sent[plan.send_slice(c)], grad_in.to(dev).contiguous(),
                                                 plan.send_splits[c], plan.recv_splits[c]))
            ctx.graphs[c] = None  # free chunk c's saved activations
        for pending in reverse_dispatches:
            pending.wait()
        _account(returns + reverse_dispatches)
        grad_sent = torch.empty_like(grad_sent).index_copy_(0, perm.to(dev), grad_sent).to(home)  # serial order
        for i in wanted:
            if param_grads[i] is None:
                param_grads[i] = torch.zeros_like(ctx.aliases[i])
        return (grad_sent if ctx.needs_input_grad[0] else None), None, None, None, None, *param_grads


@torch.compiler.disable
def _run_overlapped(sent: torch.Tensor, plan: _Plan, experts: nn.Module) -> torch.Tensor:
    """:class:`_Overlapped` on ``experts``' parameters (eager under ``torch.compile``: the exchanges
    wait on handles and run Python callbacks)."""
    named = list(experts.named_parameters())
    params = [param for _, param in named]
    track = torch.is_grad_enabled() and (sent.requires_grad or any(param.requires_grad for param in params))
    return _Overlapped.apply(sent, plan, experts, track, tuple(name for name, _ in named), *params)
