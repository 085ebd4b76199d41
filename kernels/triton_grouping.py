"""Triton kernels that group a router's T*k choices by expert: a stable counting sort.

Input: ``expert_ids [S]`` (S = T*k slots; slot ``s`` is token ``s // k``'s ``s % k``-th choice; every
id in ``0..E-1``) and the slots' gate weights ``[S]``. Output, exactly what a stable argsort of the
ids gives (``moe.dispatch.sort_by_expert``), without sorting:

- ``row_index [S]`` int64: the token of each grouped row (grouped by expert, token order within one);
- ``row_weight [S]``: the gate weight of each grouped row;
- ``source_order [S]`` int64: the grouped row of each slot (the inverse permutation);
- ``offsets [E]`` int32: cumulative group ends (``F.grouped_mm``'s ``offs``).

A stable sort by a key of E values is a counting sort: slot s goes to
``(slots of experts < e) + (slots of expert e before s)``. Three launches, no host sync:

1. :func:`_block_histogram_kernel`: program b counts the ids of slots ``[b*BLOCK, (b+1)*BLOCK)`` per
   expert into ``hist [E, B]`` (expert-major).
2. ``torch.cumsum`` over the flattened ``hist``: entry ``(e, b)`` becomes the number of slots of experts
   before e plus those of expert e in blocks up to b, i.e. the end of block b's run of expert e.
3. :func:`_block_scatter_kernel`: program b ranks each of its slots among the block's earlier slots of
   the same expert (a ``[BLOCK, BLOCK]`` comparison), so slot s lands at
   ``end(e, b) - (block's slots of e) + rank``, and writes row_index, row_weight and source_order
   there; the last program also writes ``offsets`` (the ends of each expert's last block).

Against the argsort path (on a GPU a radix sort of several launches, then an iota, a scatter for the
inverse, a division, a gather of the weights and a cumsum for the offsets) this is three launches,
and the weights' backward is one gather through ``source_order`` instead of a zero fill and an
``index_put``. Positions are int32 inside the kernels (``S < 2**31``), and nothing uses atomics.

This module imports triton at import time; import it only once ``TRITON_INTERPRET`` has its final
value (``kernels.triton_ops`` imports it lazily, at the first call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_kernels import interpreting
from kernels.triton_ops import GROUPING_MAX_EXPERTS as MAX_EXPERTS

# Slots per program. The scatter kernel compares a block's ids pairwise ([BLOCK, BLOCK] on 4 warps:
# 32 elements per thread at 64); the histogram kernel compares them with EXPERT_CHUNK experts at a time.
BLOCK_SLOTS = 64
EXPERT_CHUNK = 64


@triton.jit
def _block_histogram_kernel(ids_ptr, hist_ptr, num_slots, num_blocks, num_experts, BLOCK: tl.constexpr,
                            E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """hist[e * num_blocks + b] = number of slots of block b whose id is e."""
    b = tl.program_id(0)
    slots = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=E_PAD).to(tl.int32)  # past the end: no expert
    for start in tl.static_range(0, E_PAD, CHUNK):
        experts = start + tl.arange(0, CHUNK)
        counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)  # [CHUNK]
        tl.store(hist_ptr + experts.to(tl.int64) * num_blocks + b, counts, mask=experts < num_experts)


@triton.jit
def _block_scatter_kernel(ids_ptr, weight_ptr, ends_ptr, row_index_ptr, row_weight_ptr, source_order_ptr, offsets_ptr,
                          num_slots, num_blocks, num_experts, top_k, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """Each slot of block b to its grouped row; ``ends`` is the inclusive cumsum of the expert-major
    histogram (see the module docstring)."""
    b = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    slots = b * BLOCK + lanes
    valid = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=valid, other=E_PAD).to(tl.int32)
    same = ids[:, None] == ids[None, :]  # [BLOCK, BLOCK]
    earlier = lanes[None, :] < lanes[:, None]
    rank = tl.sum((same & earlier).to(tl.int32), axis=1)  # earlier slots of the same expert in the block
    in_block = tl.sum(same.to(tl.int32), axis=1)  # slots of the same expert in the block
    end = tl.load(ends_ptr + ids.to(tl.int64) * num_blocks + b, mask=valid, other=0)  # E * blocks may pass 2**31
    position = end - in_block + rank  # [BLOCK] int32
    tl.store(row_index_ptr + position, (slots // top_k).to(tl.int64), mask=valid)
    tl.store(row_weight_ptr + position, tl.load(weight_ptr + slots, mask=valid), mask=valid)
    tl.store(source_order_ptr + slots, position.to(tl.int64), mask=valid)
    if b == num_blocks - 1:
        experts = tl.arange(0, E_PAD)
        known = experts < num_experts
        tl.store(offsets_ptr + experts, tl.load(ends_ptr + experts.to(tl.int64) * num_blocks + b, mask=known),
                 mask=known)


def _e_pad(num_experts: int) -> int:
    """Experts rounded up to a power of two of at least EXPERT_CHUNK; the value itself is the id of
    the lanes past the last slot (it matches no expert)."""
    return max(EXPERT_CHUNK, triton.next_power_of_2(num_experts))


def group_by_expert(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """(row_index [S] int64, row_weight [S], source_order [S] int64, offsets [E] int32) of the T*k = S
    choices ``indices [T, k]`` (ids in ``0..num_experts-1``, the caller's promise) with gate
    ``weights [T, k]``; see the module docstring."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"group_by_expert: at most {MAX_EXPERTS} experts, got {num_experts}")
    top_k = indices.shape[1]
    expert_ids, weights = indices.reshape(-1), weights.reshape(-1)
    num_slots = expert_ids.shape[0]
    if num_slots >= 2**31:
        raise ValueError(f"group_by_expert: {num_slots} slots do not fit the kernels' int32 positions")
    device = expert_ids.device
    row_index = torch.empty(num_slots, dtype=torch.int64, device=device)
    row_weight = torch.empty(num_slots, dtype=weights.dtype, device=weights.device)
    source_order = torch.empty(num_slots, dtype=torch.int64, device=device)
    if num_slots == 0:
        return row_index, row_weight, source_order, torch.zeros(num_experts, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=device)
    ids, weights = expert_ids.contiguous(), weights.contiguous()
    num_blocks = triton.cdiv(num_slots, BLOCK_SLOTS)
    e_pad = _e_pad(num_experts)
    warps = {} if interpreting() else dict(num_warps=4)
    hist = torch.empty(num_experts * num_blocks, dtype=torch.int32, device=device)
    _block_histogram_kernel[(num_blocks,)](ids, hist, num_slots, num_blocks, num_experts, BLOCK=BLOCK_SLOTS,
                                           E_PAD=e_pad, CHUNK=EXPERT_CHUNK, **warps)
    ends = torch.cumsum(hist, 0, dtype=torch.int32)
    _block_scatter_kernel[(num_blocks,)](ids, weights, ends, row_index, row_weight, source_order, offsets, num_slots,
                                         num_blocks, num_experts, top_k, BLOCK=BLOCK_SLOTS, E_PAD=e_pad, **warps)
    return row_index, row_weight, source_order, offsets
