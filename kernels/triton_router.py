"""Triton kernels for a router's selection: top-k, gate weights and per-expert counts in one pass
over the fp32 logits, and the logits' gradient in one more.

Forward (:func:`_topk_route_kernel`), per token, from its logits row ``l [E]`` (fp32):

- scores ``s = softmax(l)`` (SCORE 0) or ``sigmoid(l)`` (SCORE 1);
- selection ``s + bias`` with a per-expert bias (bias balancing steers the choice only), else the
  logits themselves for softmax (the same order as the scores) or ``s`` for sigmoid;
- the k best by selection, best first (as ``torch.topk`` returns them; a tie goes to the lower id);
- gate weights from the *unbiased* scores of the k: with NORMALIZE the softmax over the k chosen
  logits (which equals ``s_i / sum s_j``) or ``s_i / sum s_j`` for sigmoid; without it ``s_i``;
- the choices per expert, added to ``counts [E]`` with one atomic add per expert per program.

Backward (:func:`_topk_route_backward_kernel`): the gradient of the logits from that of the gate
weights, written as a whole ``[T, E]`` row (zeros where the logit did not enter a weight), so no
zero fill is launched. With ``g`` the weights' gradient and ``w`` the weights:

- softmax, NORMALIZE: only the k chosen logits enter, ``dl_j = w_j (g_j - sum_i w_i g_i)``;
- softmax: ``dl = s * (G - sum_i w_i g_i)`` over the whole row (``G`` is ``g`` at the chosen experts);
- sigmoid, NORMALIZE: ``dl_j = s_j (1 - s_j) (g_j - sum_i w_i g_i) / sum_i s_i``;
- sigmoid: ``dl_j = s_j (1 - s_j) g_j``.

This replaces, per MoE layer, torch's softmax, bias add, top-k, gather, sum, division and
scatter-add of the counts (and their backward: a division's, a gather's scatter-add into zeros and
the softmax's) with two launches forward (the counts' zero fill and the kernel) and one backward.

This module imports triton at import time; import it only once ``TRITON_INTERPRET`` has its final
value (``kernels.triton_ops`` imports it lazily, at the first call).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_kernels import interpreting

SCORE_CODES = {"softmax": 0, "sigmoid": 1}
TILE_ELEMENTS = 1024  # logits per program: BLOCK_T tokens of E_PAD experts (8 per thread on 4 warps)


@triton.jit
def _logit_tile(logits_ptr, num_tokens, num_experts, stride_t, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
                K_PAD: tl.constexpr):
    """This program's tokens, expert columns, k slots, their masks, and its ``[BLOCK_T, E_PAD]`` logits
    (-inf in the padding columns; rows past the last token are zeros, so they stay finite)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    ks = tl.arange(0, K_PAD)
    live = tokens < num_tokens
    known = cols < num_experts
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride_t + cols[None, :],
                     mask=live[:, None] & known[None, :], other=0.0)
    return tokens, cols, ks, live, known, tl.where(known[None, :], logits, -float("inf"))


@triton.jit
def _scores(logits, known, SCORE: tl.constexpr):
    """softmax (SCORE 0) or sigmoid (SCORE 1) of each row of logits; 0 in the padding columns."""
    if SCORE == 0:
        exps = tl.exp(tl.where(known[None, :], logits - tl.max(logits, axis=1)[:, None], -float("inf")))
        scores = exps / tl.sum(exps, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)
    return scores


@triton.jit
def _topk_route_kernel(logits_ptr, bias_ptr, indices_ptr, weights_ptr, counts_ptr, num_tokens, num_experts, top_k,
                       stride_t, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                       SCORE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr):
    tokens, cols, ks, live, known, logits = _logit_tile(logits_ptr, num_tokens, num_experts, stride_t, BLOCK_T, E_PAD,
                                                        K_PAD)
    scores = _scores(logits, known, SCORE)
    if HAS_BIAS:
        selection = scores + tl.load(bias_ptr + cols, mask=known, other=0.0)[None, :]
    elif SCORE == 0:
        selection = logits
    else:
        selection = scores
    selection = tl.where(known[None, :], selection, -float("inf"))
    chosen = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    chosen_logit = tl.full((BLOCK_T, K_PAD), -float("inf"), dtype=tl.float32)
    chosen_score = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    picked = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for j in range(top_k):
        best = tl.argmax(selection, axis=1, tie_break_left=True)  # [BLOCK_T]
        hit = cols[None, :] == best[:, None]
        slot = ks[None, :] == j
        chosen = tl.where(slot, best[:, None], chosen)
        chosen_logit = tl.where(slot, tl.sum(tl.where(hit, logits, 0.0), axis=1)[:, None], chosen_logit)
        chosen_score = tl.where(slot, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], chosen_score)
        picked += hit.to(tl.int32)
        selection = tl.where(hit, -float("inf"), selection)
    if NORMALIZE:
        if SCORE == 0:  # the softmax over the k chosen logits
            exps_k = tl.exp(chosen_logit - tl.max(chosen_logit, axis=1)[:, None])  # exp(-inf) = 0 past k
            weights = exps_k / tl.sum(exps_k, axis=1)[:, None]
        else:
            weights = chosen_score / tl.maximum(tl.sum(chosen_score, axis=1)[:, None], 1e-20)
    else:
        weights = chosen_score
    out = tokens[:, None].to(tl.int64) * top_k + ks[None, :]
    out_mask = live[:, None] & (ks[None, :] < top_k)
    tl.store(indices_ptr + out, chosen.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out, weights, mask=out_mask)
    counts = tl.sum(tl.where(live[:, None], picked, 0), axis=0)  # [E_PAD]
    tl.atomic_add(counts_ptr + cols, counts.to(tl.int64), mask=known & (counts > 0))


@triton.jit
def _topk_route_backward_kernel(grad_ptr, logits_ptr, indices_ptr, weights_ptr, grad_logits_ptr, num_tokens,
                                num_experts, top_k, stride_t, stride_gt, BLOCK_T: tl.constexpr,
                                E_PAD: tl.constexpr, K_PAD: tl.constexpr, SCORE: tl.constexpr,
                                NORMALIZE: tl.constexpr):
    tokens, cols, ks, live, known, logits = _logit_tile(logits_ptr, num_tokens, num_experts, stride_t, BLOCK_T, E_PAD,
                                                        K_PAD)
    tile = live[:, None] & known[None, :]
    at_k = tokens[:, None].to(tl.int64) * top_k + ks[None, :]
    k_mask = live[:, None] & (ks[None, :] < top_k)
    grad = tl.load(grad_ptr + at_k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_T, K_PAD]
    weights = tl.load(weights_ptr + at_k, mask=k_mask, other=0.0)
    chosen = tl.load(indices_ptr + at_k, mask=k_mask, other=E_PAD).to(tl.int32)
    weighted = tl.sum(weights * grad, axis=1)[:, None]  # sum_i w_i g_i
    # spread: the weights' gradient at the chosen experts' columns; member: 1 there; weight_row: w there
    spread = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    member = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    weight_row = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for j in range(top_k):
        slot = ks[None, :] == j
        expert = tl.sum(tl.where(slot, chosen, 0), axis=1)
        hit = cols[None, :] == expert[:, None]
        spread += tl.where(hit, tl.sum(tl.where(slot, grad, 0.0), axis=1)[:, None], 0.0)
        member += hit.to(tl.float32)
        if SCORE == 0 and NORMALIZE:
            weight_row += tl.where(hit, tl.sum(tl.where(slot, weights, 0.0), axis=1)[:, None], 0.0)
    if SCORE == 0:
        if NORMALIZE:  # the softmax over the chosen logits: only they enter
            grad_logits = weight_row * (spread - weighted * member)
        else:
            grad_logits = _scores(logits, known, SCORE) * (spread - weighted)
    else:
        scores = _scores(logits, known, SCORE)
        slope = scores * (1.0 - scores)
        if NORMALIZE:
            total = tl.maximum(tl.sum(scores * member, axis=1)[:, None], 1e-20)
            grad_logits = slope * member * (spread - weighted) / total
        else:
            grad_logits = slope * spread
    grad_logits = tl.where(tile, grad_logits, 0.0)
    tl.store(grad_logits_ptr + tokens[:, None].to(tl.int64) * stride_gt + cols[None, :], grad_logits, mask=tile)


def _tiles(num_experts: int, top_k: int) -> tuple[int, int, int]:
    e_pad = triton.next_power_of_2(max(2, num_experts))
    k_pad = triton.next_power_of_2(max(2, top_k))
    block_t = max(1, min(64, TILE_ELEMENTS // e_pad))
    if interpreting():
        block_t = min(block_t, 16)
    return block_t, e_pad, k_pad


def topk_route(logits: torch.Tensor, top_k: int, bias: Optional[torch.Tensor], score: str, normalize: bool):
    """(indices [T, k] int64, weights [T, k] fp32, counts [E] int64) of fp32 ``logits [T, E]``."""
    num_tokens, num_experts = logits.shape
    device = logits.device
    indices = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return indices, weights, counts
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_t, e_pad, k_pad = _tiles(num_experts, top_k)
    warps = {} if interpreting() else dict(num_warps=4)
    _topk_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, bias if bias is not None else logits, indices, weights, counts, num_tokens, num_experts, top_k,
        logits.stride(0), BLOCK_T=block_t, E_PAD=e_pad, K_PAD=k_pad, SCORE=SCORE_CODES[score],
        NORMALIZE=normalize, HAS_BIAS=bias is not None, **warps)
    return indices, weights, counts


def topk_route_backward(grad_weights: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
                        weights: torch.Tensor, score: str, normalize: bool) -> torch.Tensor:
    """``[T, E]`` fp32: the gradient of the logits from that of the gate weights (see the module docstring)."""
    num_tokens, num_experts = logits.shape
    top_k = indices.shape[1]
    grad_logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=logits.device)
    if num_tokens == 0:
        return grad_logits
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad_weights, indices, weights = grad_weights.contiguous(), indices.contiguous(), weights.contiguous()
    block_t, e_pad, k_pad = _tiles(num_experts, top_k)
    warps = {} if interpreting() else dict(num_warps=4)
    _topk_route_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
        grad_weights, logits, indices, weights, grad_logits, num_tokens, num_experts, top_k, logits.stride(0),
        grad_logits.stride(0), BLOCK_T=block_t, E_PAD=e_pad, K_PAD=k_pad, SCORE=SCORE_CODES[score],
        NORMALIZE=normalize, **warps)
    return grad_logits
