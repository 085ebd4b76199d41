"""Triton kernels for the expert MLPs: grouped GEMMs over rows sorted by expert, and their launchers.

Notation: ``N`` grouped rows sorted by expert, ``E`` experts, ``offsets [E]`` int32 cumulative group
ends (``F.grouped_mm``'s ``offs``; groups may be empty). Rows ``offsets[-1]:N`` belong to no expert;
they form a pseudo-group ``E`` whose output rows are written as zeros (the per-expert loop's
semantics), so every output row is written and no output needs a memset.

Kernels (all accumulate in fp32; inputs bf16, fp16 or fp32; outputs in the input dtype):

- :func:`_grouped_gemm_kernel`: ``c[i] = (a[idx(i)] @ b[e(i)]) * scale[i]`` (+ ``a2[i] @ b2[e(i)]``),
  with an optional row gather ``idx = a_index`` and an optional per-row scale.
- :func:`_gemm_act_kernel`: the first expert GEMM with the gather and the activation fused: both
  ``x@w1[e]`` and ``x@w3[e]`` tiles for SwiGLU, ``silu(h1) * h3`` written; optionally h1/h3 saved.
- :func:`_act_backward_gemm_kernel`: ``g = grad_out[idx(i)] @ w2[e]^T`` with the activation
  backward, the row-weight gradient and the weighting of the activation fused into the epilogue.
- :func:`_grouped_xty_kernel`: weight gradients ``X[rows of e]^T @ Y[rows of e]`` per expert, X and/or
  Y read through a gather index, one or two Y operands; empty experts give zeros. Each program takes
  one row chunk of one expert; :func:`_xty_chunk_reduce_kernel` adds up the chunks of split experts.
- :func:`_segment_sum_kernel`: the deterministic scatter-add: ``out[m] = sum of src rows i with
  row_index[i] == m``, in increasing ``i``, accumulated in fp32.

Tile schedule: a tile of ``BLOCK_M`` rows never straddles two experts. Every program rebuilds the
schedule from ``offsets`` on the device (``cdiv(count_e, BLOCK_M)`` tiles per group, a prefix sum,
and a search for its own tile), so no host sync and no extra launch are needed; the grid is the
upper bound ``min(cdiv(N, BLOCK_M) + E, N)`` tiles in M, and programs past the real tile count exit
at once. Tiles are ordered with the usual ``GROUP_M`` swizzle for L2 reuse of the weight panels.

Weight-gradient row chunks: one program per (expert, output tile) walking all of the expert's rows
leaves the GPU idle under skewed routing (one expert with most rows has only its few tiles' worth of
programs). So each expert's rows are split into ``n_e = max(1, count_e // chunk_rows)`` chunks of
equal size (boundaries rounded down to BLOCK_M within the expert), with ``chunk_rows`` from
:func:`xty_chunk_rows`: ``max(1024, cdiv(N, E))`` rounded up to 256 rows, raised on a GPU to
``N * tiles / (8 * SMs)`` when one expert's [K, N] tiles alone fill the GPU many times over (then
nothing is split). Under uniform routing no expert reaches ``2 * chunk_rows`` rows, so nothing is
split and nothing extra is done. The chunk schedule is rebuilt from ``offsets`` by every program
(like the tile schedule) over an upper-bound grid ``(tiles of [K, N], E + max(0, N // chunk_rows - 1))``
whose extra programs exit. An expert of one chunk (empty experts included: zeros) is stored
straight into the output; an expert of several stores each chunk's fp32 sum into its own slot of a
``partial [slots, K, N]`` buffer, and a second kernel sums each such expert's slots in chunk order
into the output, in the output dtype. Memory: ``slots <= N // chunk_rows <= E``, so the partial
buffer is at most the weight gradient's element count in fp32 (per output), allocated only when
``N >= 2 * chunk_rows``. Chunk sizes depend on the shapes only, and there are no atomics.

Scatter-add: the expert outputs are written per assignment (row ``i`` of an ``[N, d]`` buffer, the
row weight applied in the GEMM epilogue) and then reduced by :func:`segment_sum` in a fixed order.
Nothing uses atomics, so every result is bitwise deterministic run to run.

This module imports triton at import time; import it only once ``TRITON_INTERPRET`` has its final
value (``kernels.triton_ops`` imports it lazily, at the first call).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

ACTIVATION_CODES = {"swiglu": 0, "gelu": 1, "relu": 2}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row tiles at a time so weight panels stay in L2."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_schedule(pid_m, offsets_ptr, num_rows, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(group, first row, group end row, number of tiles) for row tile ``pid_m``.

    Groups are the E experts plus the pseudo-group E of rows past ``offsets[-1]``; each group has
    ``cdiv(count, BLOCK_M)`` tiles. ``group`` is meaningless when ``pid_m >= number of tiles``.
    """
    e = tl.arange(0, E_PAD)
    ends = tl.load(offsets_ptr + e, mask=e < num_experts, other=0)
    ends = tl.where(e == num_experts, num_rows, ends)
    starts = tl.load(offsets_ptr + e - 1, mask=(e >= 1) & (e <= num_experts), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    num_tiles = tl.sum(tiles, 0)
    group = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    here = e == group
    first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(here, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, ends, 0), 0)
    return group, row_start, row_end, num_tiles


@triton.jit
def _activate(h1, h3, ACTIVATION: tl.constexpr):
    """act(h1[, h3]) in fp32: 0 SwiGLU silu(h1) * h3, 1 exact (erf) GELU, 2 ReLU."""
    if ACTIVATION == 0:
        return h1 * tl.sigmoid(h1) * h3
    elif ACTIVATION == 1:
        return 0.5 * h1 * (1.0 + tl.erf(h1 * 0.7071067811865476))
    else:
        return tl.maximum(h1, 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_rows", "num_experts", "tune_rows"])
def _grouped_gemm_kernel(
    a_ptr, a2_ptr, a_index_ptr, b_ptr, b2_ptr, scale_ptr, c_ptr, offsets_ptr,
    num_rows, K, M, num_experts, tune_rows,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    GATHER: tl.constexpr, SCALE: tl.constexpr, DUAL: tl.constexpr, E_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[i, :] = (a[src(i)] @ b[e] (+ a2[src(i)] @ b2[e])) * scale[i] for grouped row i of expert e.

    a/a2 share strides, b/b2 share strides; src(i) = a_index[i] with GATHER, else i.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.minimum(tl.cdiv(num_rows, BLOCK_M) + num_experts, num_rows)
    num_pid_n = tl.cdiv(M, BLOCK_N)
    pid_m, pid_n = _swizzle(pid, num_pid_m, num_pid_n, GROUP_M)
    group, row_start, row_end, num_tiles = _tile_schedule(
        pid_m, offsets_ptr, num_rows, num_experts, BLOCK_M, E_PAD)
    if pid_m >= num_tiles:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if GATHER:
        src = tl.load(a_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
    a2_ptrs = a2_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
    b_off = group.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    b_ptrs = b_ptr + b_off
    b2_ptrs = b2_ptr + b_off

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The pseudo-group of rows past offsets[-1] runs no K iterations: its rows are zeros.
    k_tiles = tl.where(group < num_experts, tl.cdiv(K, BLOCK_K), 0)
    for kk in range(0, k_tiles):
        k_mask = ks < K - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if DUAL:
            a2 = tl.load(a2_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=INPUT_PRECISION)
            a2_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    # Tile-local offsets in int32 (BLOCK_M * stride fits); the tile's first row moves the base in int64.
    c_ptrs = c_ptr + row_start.to(tl.int64) * stride_cm + (tl.arange(0, BLOCK_M)[:, None] * stride_cm
                                                           + cols[None, :] * stride_cn)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["num_rows", "num_experts", "tune_rows"])
def _gemm_act_kernel(
    x_ptr, row_index_ptr, w1_ptr, w3_ptr, act_ptr, h1_ptr, h3_ptr, offsets_ptr,
    num_rows, K, M, num_experts, tune_rows,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_hm, stride_hn,
    ACTIVATION: tl.constexpr, SAVE: tl.constexpr, E_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """act[i] = act(x[row_index[i]] @ w1[e], x[row_index[i]] @ w3[e]); h1/h3 (pre-activation) saved with SAVE.

    w1/w3 share strides; act/h1/h3 share strides. SwiGLU (ACTIVATION 0) reads each x tile once for
    both GEMMs.
    """
    SWIGLU: tl.constexpr = ACTIVATION == 0
    pid = tl.program_id(0)
    num_pid_m = tl.minimum(tl.cdiv(num_rows, BLOCK_M) + num_experts, num_rows)
    num_pid_n = tl.cdiv(M, BLOCK_N)
    pid_m, pid_n = _swizzle(pid, num_pid_m, num_pid_n, GROUP_M)
    group, row_start, row_end, num_tiles = _tile_schedule(
        pid_m, offsets_ptr, num_rows, num_experts, BLOCK_M, E_PAD)
    if pid_m >= num_tiles:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    src = tl.load(row_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
    w_off = group.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    w1_ptrs = w1_ptr + w_off
    w3_ptrs = w3_ptr + w_off

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.where(group < num_experts, tl.cdiv(K, BLOCK_K), 0)
    for kk in range(0, k_tiles):
        k_mask = ks < K - kk * BLOCK_K
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        acc1 = tl.dot(a, tl.load(w1_ptrs, mask=w_mask, other=0.0), acc1, input_precision=INPUT_PRECISION)
        if SWIGLU:
            acc3 = tl.dot(a, tl.load(w3_ptrs, mask=w_mask, other=0.0), acc3, input_precision=INPUT_PRECISION)
            w3_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_wk

    out_ty = act_ptr.dtype.element_ty
    # The activation reads h rounded to the storage dtype, exactly what backward will reload.
    h1 = acc1.to(out_ty)
    h3 = acc3.to(out_ty)
    act = _activate(h1.to(tl.float32), h3.to(tl.float32), ACTIVATION)
    base = row_start.to(tl.int64) * stride_hm
    h_off = tl.arange(0, BLOCK_M)[:, None] * stride_hm + cols[None, :] * stride_hn
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(act_ptr + base + h_off, act.to(out_ty), mask=mask)
    if SAVE:
        tl.store(h1_ptr + base + h_off, h1, mask=mask)
        if SWIGLU:
            tl.store(h3_ptr + base + h_off, h3, mask=mask)


@triton.jit(do_not_specialize=["num_rows", "num_experts", "tune_rows"])
def _act_backward_gemm_kernel(
    g_ptr, row_index_ptr, w2_ptr, h1_ptr, h3_ptr, row_weight_ptr, offsets_ptr,
    dh1_ptr, dh3_ptr, act_w_ptr, drw_ptr,
    num_rows, K, M, num_experts, tune_rows,
    stride_gm, stride_gk, stride_we, stride_wk, stride_wn, stride_hm, stride_hn, stride_drw,
    ACTIVATION: tl.constexpr, NEED_DH: tl.constexpr, NEED_ACT_W: tl.constexpr, NEED_DRW: tl.constexpr,
    DRW_SLOTS: tl.constexpr, E_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Backward through w2 and the activation, for grouped row i of expert e (w2 read as w2[e]^T via strides):

    - ``ga = grad_out[row_index[i]] @ w2[e]^T``: gradient of the unweighted activation [N, f];
    - ``drw[n_tile, i] = sum over the tile's columns of ga * act``: partial row-weight gradients
      (one slot per column tile; the last column tile zeroes slots up to DRW_SLOTS, so the buffer is
      always fully written whatever BLOCK_N the autotuner picked; summed on the host side);
    - ``dh1, dh3``: gradient of the pre-activations of ``row_weight[i] * ga``;
    - ``act_w = row_weight[i] * act``: the second GEMM's input, for the w2 gradient.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.minimum(tl.cdiv(num_rows, BLOCK_M) + num_experts, num_rows)
    num_pid_n = tl.cdiv(M, BLOCK_N)
    pid_m, pid_n = _swizzle(pid, num_pid_m, num_pid_n, GROUP_M)
    group, row_start, row_end, num_tiles = _tile_schedule(
        pid_m, offsets_ptr, num_rows, num_experts, BLOCK_M, E_PAD)
    if pid_m >= num_tiles:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    src = tl.load(row_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    ks = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + src[:, None] * stride_gm + ks[None, :] * stride_gk
    w_ptrs = w2_ptr + group.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.where(group < num_experts, tl.cdiv(K, BLOCK_K), 0)
    for kk in range(0, k_tiles):
        k_mask = ks < K - kk * BLOCK_K
        g = tl.load(g_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_K * stride_gk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue. Tile-local offsets are int32 (BLOCK_M * stride fits); the tile's first row moves the
    # base pointers in int64. SwiGLU reuses sigmoid(h1) and silu(h1) across act, dh1 and dh3.
    mask = row_mask[:, None] & col_mask[None, :]
    base = row_start.to(tl.int64) * stride_hm
    h_off = tl.arange(0, BLOCK_M)[:, None] * stride_hm + cols[None, :] * stride_hn
    h1 = tl.load(h1_ptr + base + h_off, mask=mask, other=0.0).to(tl.float32)
    rw = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    out_ty = dh1_ptr.dtype.element_ty
    if ACTIVATION == 0:
        h3 = tl.load(h3_ptr + base + h_off, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(h1)
        silu = h1 * sig
        act = silu * h3
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.erf(h1 * 0.7071067811865476))
        act = h1 * cdf
    else:
        act = tl.maximum(h1, 0.0)

    if NEED_DRW:
        drw_ptrs = drw_ptr + rows
        tl.store(drw_ptrs + pid_n.to(tl.int64) * stride_drw, tl.sum(acc * act, axis=1), mask=row_mask)
        if pid_n == num_pid_n - 1:
            slot_ptrs = drw_ptrs + (pid_n.to(tl.int64) + 1) * stride_drw  # slot num_pid_n
            for _ in range(num_pid_n, DRW_SLOTS):
                tl.store(slot_ptrs, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=row_mask)
                slot_ptrs += stride_drw
    if NEED_ACT_W:
        tl.store(act_w_ptr + base + h_off, (act * rw[:, None]).to(out_ty), mask=mask)
    if NEED_DH:
        grad_act = acc * rw[:, None]
        if ACTIVATION == 0:
            tl.store(dh3_ptr + base + h_off, (grad_act * silu).to(out_ty), mask=mask)
            dh1 = grad_act * h3 * (sig + silu * (1.0 - sig))
        elif ACTIVATION == 1:
            dh1 = grad_act * (cdf + h1 * 0.3989422804014327 * tl.exp(-0.5 * h1 * h1))
        else:
            dh1 = tl.where(h1 > 0.0, grad_act, 0.0)
        tl.store(dh1_ptr + base + h_off, dh1.to(out_ty), mask=mask)


@triton.jit
def _chunk_schedule(chunk, offsets_ptr, num_experts, chunk_rows, E_PAD: tl.constexpr, ALIGN: tl.constexpr):
    """(expert, first row, end row, chunks of the expert, partial slot, number of chunks) of row chunk ``chunk``.

    Expert e with ``count_e`` rows has ``n_e = max(1, count_e // chunk_rows)`` chunks (so an empty
    expert has one, of no rows, and writes zeros). Chunk j of e covers rows
    ``start_e + align(j * count_e // n_e)`` to ``start_e + align((j + 1) * count_e // n_e)`` (the
    last one to the expert's end), ``align`` rounding down to a multiple of ALIGN, so the chunks of
    one expert have equal sizes up to ALIGN rows and are never empty when ``chunk_rows >= ALIGN``.
    Experts with ``n_e >= 2`` own partial slots, numbered in expert then chunk order: ``slot`` is the
    chunk's one. ``expert`` is meaningless when ``chunk >= number of chunks``.
    """
    e = tl.arange(0, E_PAD)
    real = e < num_experts
    ends = tl.load(offsets_ptr + e, mask=real, other=0)
    starts = tl.load(offsets_ptr + e - 1, mask=real & (e >= 1), other=0)
    counts = ends - starts
    chunks = tl.where(real, tl.maximum(counts // chunk_rows, 1), 0)
    chunk_end = tl.cumsum(chunks, 0)
    num_chunks = tl.sum(chunks, 0)
    expert = tl.sum((chunk_end <= chunk).to(tl.int32), 0)
    here = e == expert
    n = tl.maximum(tl.sum(tl.where(here, chunks, 0), 0), 1)  # >= 1 even past the last chunk: no division by 0
    j = chunk - tl.sum(tl.where(here, chunk_end - chunks, 0), 0)
    slot = tl.sum(tl.where((e < expert) & (chunks >= 2), chunks, 0), 0) + j
    start = tl.sum(tl.where(here, starts, 0), 0)
    count = tl.sum(tl.where(here, counts, 0), 0)
    # j * count can pass 2**31: int64 for the split points (each fits in int32 again).
    lo = start + ((j.to(tl.int64) * count // n) // ALIGN * ALIGN).to(tl.int32)
    hi_split = start + (((j + 1).to(tl.int64) * count // n) // ALIGN * ALIGN).to(tl.int32)
    hi = tl.where(j + 1 < n, hi_split, start + count)
    return expert, lo, hi, n, slot, num_chunks


@triton.jit(do_not_specialize=["num_experts", "chunk_rows", "tune_rows"])
def _grouped_xty_kernel(
    x_ptr, x_index_ptr, y_ptr, y2_ptr, y_index_ptr, out_ptr, out2_ptr, partial_ptr, partial2_ptr, offsets_ptr,
    K, N, num_experts, chunk_rows, tune_rows,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_oe, stride_ok, stride_on,
    X_GATHER: tl.constexpr, Y_GATHER: tl.constexpr, DUAL: tl.constexpr, E_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """X[rows of chunk]^T @ Y[rows of chunk] (and with Y2) for one row chunk of one expert: [K, N].

    Grid (tiles of [K, N], upper bound of the number of row chunks); see :func:`_chunk_schedule` for
    the chunks. Programs past the real chunk count exit. Each program walks its chunk's contiguous
    grouped rows BLOCK_M at a time (the reduction dimension). An expert of one chunk (an empty one
    included: zeros) is stored straight into out[e] in out's dtype; an expert of several chunks
    stores each chunk's fp32 sum into its slot of ``partial [slots, K, N]`` (contiguous), which
    :func:`_xty_chunk_reduce_kernel` then adds up in chunk order. X rows are x[x_index[i]] with
    X_GATHER, Y rows y[y_index[i]] with Y_GATHER; y/y2, out/out2 and partial/partial2 share strides.
    """
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    expert, row_start, row_end, num_expert_chunks, slot, num_chunks = _chunk_schedule(
        chunk, offsets_ptr, num_experts, chunk_rows, E_PAD, BLOCK_M)
    if chunk >= num_chunks:
        return
    pid_k, pid_n = _swizzle(pid, tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N), GROUP_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    n_mask = ns < N

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if X_GATHER:
            x_rows = tl.load(x_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            x_rows = rows.to(tl.int64)
        if Y_GATHER:
            y_rows = tl.load(y_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            y_rows = rows.to(tl.int64)
        xt = tl.load(x_ptr + x_rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                     mask=k_mask[:, None] & row_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        y_off = y_rows[:, None] * stride_ym + ns[None, :] * stride_yn
        y_mask = row_mask[:, None] & n_mask[None, :]
        acc = tl.dot(xt, tl.load(y_ptr + y_off, mask=y_mask, other=0.0), acc, input_precision=INPUT_PRECISION)
        if DUAL:
            acc2 = tl.dot(xt, tl.load(y2_ptr + y_off, mask=y_mask, other=0.0), acc2,
                          input_precision=INPUT_PRECISION)

    o_mask = k_mask[:, None] & n_mask[None, :]
    if num_expert_chunks >= 2:
        p_off = slot.to(tl.int64) * K * N + (ks[:, None] * N + ns[None, :])
        tl.store(partial_ptr + p_off, acc, mask=o_mask)
        if DUAL:
            tl.store(partial2_ptr + p_off, acc2, mask=o_mask)
    else:
        o_off = expert.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + ns[None, :] * stride_on
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        if DUAL:
            tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["num_experts", "chunk_rows"])
def _xty_chunk_reduce_kernel(partial_ptr, partial2_ptr, out_ptr, out2_ptr, offsets_ptr, num_experts, chunk_rows, size,
                             stride_oe, DUAL: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = sum of the partial slots of expert e in chunk order, in fp32, for every expert of >= 2 chunks.

    ``size = K * N``; partial [slots, K * N] and out[e] [K * N] are contiguous (out's experts
    ``stride_oe`` apart). Grid: column blocks of BLOCK. Each program lists the split experts from
    ``offsets`` (the slot numbering of :func:`_chunk_schedule`) and loops over those only: experts of
    one chunk were stored by the GEMM kernel, and without a split expert a program does nothing.
    """
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    e = tl.arange(0, E_PAD)
    real = e < num_experts
    ends = tl.load(offsets_ptr + e, mask=real, other=0)
    starts = tl.load(offsets_ptr + e - 1, mask=real & (e >= 1), other=0)
    split = real & ((ends - starts) // chunk_rows >= 2)
    slots = tl.where(split, (ends - starts) // chunk_rows, 0)
    slot_end = tl.cumsum(slots, 0)
    split_end = tl.cumsum(split.to(tl.int32), 0)
    num_split = tl.sum(split.to(tl.int32), 0)
    for i in range(0, num_split):
        expert = tl.sum((split_end <= i).to(tl.int32), 0)  # the i-th split expert
        here = e == expert
        first = tl.sum(tl.where(here, slot_end - slots, 0), 0)
        last = tl.sum(tl.where(here, slot_end, 0), 0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
        for slot in range(first, last):
            p_off = tl.cast(slot, tl.int64) * size + cols
            acc += tl.load(partial_ptr + p_off, mask=mask, other=0.0)
            if DUAL:
                acc2 += tl.load(partial2_ptr + p_off, mask=mask, other=0.0)
        o_off = expert.to(tl.int64) * stride_oe + cols
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if DUAL:
            tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, seg_ptr, out_ptr, D, stride_sm, stride_om, seg_stride,
                        BLOCK_D: tl.constexpr):
    """out[m] = sum over j in [seg[m], seg[m+1]) of src[order[j]], in increasing j, in fp32. With
    ``seg_stride > 0`` the segments are implicit, ``[m * seg_stride, (m + 1) * seg_stride)``, and
    ``seg_ptr`` is not read."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if seg_stride > 0:
        start = m.to(tl.int64) * seg_stride
        end = start + seg_stride
    else:
        start = tl.load(seg_ptr + m).to(tl.int64)
        end = tl.load(seg_ptr + m + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(start, end):
        row = tl.load(order_ptr + j).to(tl.int64)
        acc += tl.load(src_ptr + row * stride_sm + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# Under the interpreter: one small config (the interpreter is slow and ignores warps and stages).
# 16 is the smallest tile tl.dot accepts on a GPU, so the same tiles would also compile there.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4)


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps, num_stages=stages)


# H100/H200, bf16. Every config below was compiled for sm_90 with triton 3.9 (the AOT check in
# tests/kernels/test_triton.py does it for the defaults): all are software-pipelined (cp.async, wgmma
# for BLOCK_M >= 64, mma.sync below), fit the 227 KB of shared memory, and spill no registers unless
# noted. Small BLOCK_M (16, 32) is for few rows per expert (decode, many experts), where a 128-row
# tile would be mostly padding. The autotuner picks per (K, M, rows per expert bucket).
#
# One accumulator, plain epilogue (grouped_mm, the second expert GEMM, grad of x): up to 128 x 256
# (the vLLM H200 choice for large batches).
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 256, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 128, 64, 4, 4),
    _cfg(16, 128, 128, 4, 4),
]
# One accumulator, two (A, B) operand pairs (SwiGLU's grad of x): twice the shared memory per stage.
GEMM_AB2_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 128, 64, 4, 4),
    _cfg(16, 128, 64, 4, 4),
]
# One accumulator with the activation in the epilogue (GELU/ReLU first GEMM): at most 64 accumulator
# elements per thread (128 x 128 on 4 warps spilled).
ACT_CONFIGS = [
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 256, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 128, 64, 4, 4),
    _cfg(16, 128, 128, 4, 4),
]
# Two accumulators (SwiGLU's h1 and h3 tiles): at most 32 elements of each per thread, except
# 128 x 128 on 8 warps (16 bytes of spill, kept for its arithmetic intensity).
SWIGLU_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 8, 4),
    _cfg(64, 128, 64, 8, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 64, 64, 4, 4),
    _cfg(16, 64, 128, 4, 4),
]
# Backward through w2 and the activation: a heavy epilogue (two loads, three stores, a row sum), so
# at most 32 accumulator elements per thread (64 x 64 on 4 warps: 8 bytes of spill for SwiGLU).
ACT_BWD_CONFIGS = [
    _cfg(128, 64, 64, 8, 4),
    _cfg(64, 128, 64, 8, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 128, 64, 4, 4),
    _cfg(32, 64, 64, 4, 4),
    _cfg(16, 128, 64, 4, 4),
]
# Weight gradients: tiles of [BLOCK_K, BLOCK_N] of the per-expert [K, N] result, BLOCK_M rows of the
# reduction per step.
XTY_CONFIGS = [
    _cfg(32, 128, 128, 4, 4),
    _cfg(64, 128, 128, 8, 3),
    _cfg(64, 128, 128, 4, 4),
    _cfg(64, 256, 128, 8, 3),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(32, 64, 64, 4, 4),
]
# Two weight gradients from one pass over X (w1 and w3): two accumulators.
XTY_DUAL_CONFIGS = [
    _cfg(64, 128, 128, 8, 3),
    _cfg(64, 128, 128, 8, 4),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(32, 64, 64, 4, 4),
]
_CONFIGS = {"gemm": GEMM_CONFIGS, "gemm_ab2": GEMM_AB2_CONFIGS, "act": ACT_CONFIGS, "swiglu": SWIGLU_CONFIGS,
            "act_bwd": ACT_BWD_CONFIGS, "xty": XTY_CONFIGS, "xty_dual": XTY_DUAL_CONFIGS}
# When autotuning is switched off (SLIMMOE_TRITON_AUTOTUNE=0): one config per set that is sound for
# every shape (no spills, small enough tiles for skewed groups).
DEFAULT_CONFIG = {"gemm": _cfg(64, 128, 64, 4, 4), "gemm_ab2": _cfg(64, 128, 32, 4, 4), "act": _cfg(64, 128, 64, 4, 4),
                  "swiglu": _cfg(64, 64, 64, 4, 4), "act_bwd": _cfg(64, 64, 64, 4, 4), "xty": _cfg(64, 128, 64, 4, 4),
                  "xty_dual": _cfg(64, 64, 64, 4, 4)}
_KERNELS = {"grouped_gemm": _grouped_gemm_kernel, "gemm_act": _gemm_act_kernel,
            "act_backward": _act_backward_gemm_kernel, "xty": _grouped_xty_kernel}
_TUNE_KEY = {"grouped_gemm": ["K", "M", "tune_rows", "DUAL", "GATHER"],
             "gemm_act": ["K", "M", "tune_rows", "ACTIVATION", "SAVE"],
             "act_backward": ["K", "M", "tune_rows", "ACTIVATION"],
             "xty": ["K", "N", "tune_rows", "DUAL"]}


def autotune_enabled() -> bool:
    return os.environ.get("SLIMMOE_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")


# The operands whose dtype joins the tune key in _launch's own cache of the autotuner's choices.
_TUNE_DTYPES = {"grouped_gemm": ("a_ptr", "b_ptr", "c_ptr"), "gemm_act": ("x_ptr", "w1_ptr"),
                "act_backward": ("g_ptr", "w2_ptr"), "xty": ("x_ptr", "y_ptr", "out_ptr")}


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, config_set: str):
    return triton.autotune(configs=_CONFIGS[config_set], key=_TUNE_KEY[kernel_name])(_KERNELS[kernel_name])


# The config the autotuner chose, per (kernel, config set, tune key, operand dtypes). After the first
# launch of a key the kernel is launched with that config directly: the autotuner's own per-call key
# (a dict of every argument, the dtype of each tensor) costs host time on every launch, and a
# launch-bound layer pays it about ten times per forward and backward.
_CHOSEN: dict = {}


_FORCED: dict = {}


@contextlib.contextmanager
def force_config(config_set: str, config):
    """Within the block, launches that would autotune over ``config_set`` use ``config`` (for tests
    that check every autotune candidate on a GPU)."""
    if config_set not in _CONFIGS:
        raise ValueError(f"force_config: unknown config set {config_set!r}; expected one of {sorted(_CONFIGS)}")
    _FORCED[config_set] = config
    try:
        yield
    finally:
        del _FORCED[config_set]


def _launch(kernel_name: str, config_set: str, grid, **args):
    """Launch with one fixed config under the interpreter (or with autotuning off), else autotuned."""
    kernel = _KERNELS[kernel_name]
    # triton.jit picks the interpreter when the kernel is defined, i.e. at this module's import.
    if interpreting() != hasattr(kernel, "rewriter"):  # only interpreted functions have a rewriter
        raise RuntimeError(f"kernels.triton_kernels was imported with TRITON_INTERPRET "
                           f"{'unset' if interpreting() else 'set'}, and it is {'set' if interpreting() else 'unset'} "
                           f"now: set it before the first use of the Triton kernels and leave it")
    if interpreting():
        kernel[grid](**args, **INTERPRET_CONFIG)
    elif config_set in _FORCED:
        config = _FORCED[config_set]
        kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    elif autotune_enabled():
        key = (kernel_name, config_set, *(args[name] for name in _TUNE_KEY[kernel_name]),
               *(args[name].dtype for name in _TUNE_DTYPES[kernel_name]))
        config = _CHOSEN.get(key)
        if config is None:
            tuner = _tuned(kernel_name, config_set)
            tuner[grid](**args)  # benchmarks every candidate the first time its own key is seen
            _CHOSEN[key] = tuner.best_config
        else:
            kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        config = DEFAULT_CONFIG[config_set]
        kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE unless torch allows TF32 for matmuls. 16-bit inputs ignore it (Triton's default)."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _tune_rows(num_rows: int, num_experts: int) -> int:
    """Autotune key for the rows per expert: a power of two, so a handful of buckets ever get tuned."""
    return min(1 << 14, triton.next_power_of_2(max(1, num_rows // max(1, num_experts))))


def _m_grid(num_rows: int, num_experts: int, cols: int):
    def grid(meta):
        tiles_m = min(triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts, num_rows)
        return (tiles_m * triton.cdiv(cols, meta["BLOCK_N"]),)

    return grid


def _e_pad(num_experts: int) -> int:
    return triton.next_power_of_2(num_experts + 1)


# Weight-gradient row chunks (see the module docstring). XTY_CHUNK_ROWS forces a chunk size (tests
# set it small to get many chunks from a few rows); None picks one with xty_chunk_rows' rule.
XTY_CHUNK_ROWS = None
XTY_MIN_CHUNK_ROWS = 1024  # partial fp32 write + read per chunk stays small next to 2 * rows FLOPs per entry
XTY_CHUNK_ALIGN = 256  # a multiple of every BLOCK_M in the xty configs
XTY_WAVES = 8  # the longest program should take at most ~1/XTY_WAVES of an evenly spread kernel


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device):
    """Streaming multiprocessors of a CUDA device; None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def xty_chunk_rows(num_rows: int, num_experts: int, K: int, N: int, sm_count=None) -> int:
    """Rows per weight-gradient chunk: an expert of ``count`` rows is split into ``max(1, count // chunk)``
    chunks of equal size (up to alignment): an unsplit expert has fewer than ``2 * chunk`` rows, the
    chunks of a split one between ``chunk`` and ``1.5 * chunk`` rows.

    ``max(XTY_MIN_CHUNK_ROWS, cdiv(num_rows, num_experts))``, and on a GPU at least
    ``num_rows * tiles / (XTY_WAVES * sm_count)`` with ``tiles`` the [K, N] tiles per expert of the
    largest config (128 x 256): when one expert's tiles alone fill the GPU several times over, no
    chunking is needed and none is done. Rounded up to XTY_CHUNK_ALIGN. Under uniform routing an
    expert has about ``num_rows / num_experts < 2 * chunk`` rows: one chunk, the unsplit kernel.
    Depends only on the shapes, so results stay bitwise deterministic run to run.
    """
    if XTY_CHUNK_ROWS is not None:
        return int(XTY_CHUNK_ROWS)
    chunk = max(XTY_MIN_CHUNK_ROWS, triton.cdiv(num_rows, max(1, num_experts)))
    if sm_count:
        tiles = triton.cdiv(K, 128) * triton.cdiv(N, 256)
        chunk = max(chunk, num_rows * tiles // (XTY_WAVES * sm_count))
    return triton.cdiv(chunk, XTY_CHUNK_ALIGN) * XTY_CHUNK_ALIGN


def xty_chunk_bounds(num_rows: int, num_experts: int, chunk_rows: int) -> tuple[int, int]:
    """(chunks, partial slots): upper bounds, whatever the routing, for ``num_rows`` grouped rows.

    With ``f_e = count_e // chunk_rows`` (``sum f_e <= num_rows // chunk_rows =: q``): chunks
    ``sum max(1, f_e) = E + sum max(0, f_e - 1) <= E + max(0, q - 1)``; slots (only experts with
    ``f_e >= 2`` have any) ``<= q``, and none when ``q < 2``. With the default rule
    ``chunk_rows >= num_rows / E``, so ``q <= E``: the fp32 partial buffer holds at most E slots of
    [K, N], the element count of the weight gradient itself (twice its bf16 bytes; twice that again
    for the two-output variant), and is only allocated when some expert could have 2 chunks.
    """
    q = num_rows // chunk_rows
    return num_experts + max(0, q - 1), (q if q >= 2 else 0)


# ---------------------------------------------------------------------------------------------
# Launchers (plain functions on tensors; autograd lives in kernels.triton_ops)
# ---------------------------------------------------------------------------------------------


def _vector(t):
    """1-D index/weight tensors are read as ``ptr + i``: make them contiguous (a no-op almost always)."""
    return t.contiguous() if t is not None else None


def grouped_gemm(a, b, offsets, *, a_index=None, row_scale=None, a2=None, b2=None, out_dtype=None):
    """``c [N, M]``: grouped row i of expert e is ``(a[src(i)] @ b[e] + a2[src(i)] @ b2[e]) * row_scale[i]``.

    ``a [*, K]`` (``N`` rows, or any number of rows read through ``a_index [N]``), ``b [E, K, M]`` of
    any strides (a transposed view works), ``offsets [E]`` int32. ``a2``/``b2`` must have the strides
    of ``a``/``b``. Rows past ``offsets[-1]`` are zeros.
    """
    offsets, a_index, row_scale = _vector(offsets), _vector(a_index), _vector(row_scale)
    num_rows = a_index.shape[0] if a_index is not None else a.shape[0]
    num_experts, K, M = b.shape
    c = a.new_empty(num_rows, M, dtype=out_dtype or a.dtype)
    if num_rows == 0 or M == 0:
        return c
    if K == 0:
        return c.zero_()
    if a2 is not None and (a2.stride() != a.stride() or b2.stride() != b.stride()):
        raise ValueError("grouped_gemm: a2/b2 must have the strides of a/b")
    _launch(
        "grouped_gemm", "gemm_ab2" if a2 is not None else "gemm", _m_grid(num_rows, num_experts, M),
        a_ptr=a, a2_ptr=a2 if a2 is not None else a, a_index_ptr=a_index if a_index is not None else offsets,
        b_ptr=b, b2_ptr=b2 if b2 is not None else b, scale_ptr=row_scale if row_scale is not None else offsets,
        c_ptr=c, offsets_ptr=offsets, num_rows=num_rows, K=K, M=M, num_experts=num_experts,
        tune_rows=_tune_rows(num_rows, num_experts),
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_be=b.stride(0), stride_bk=b.stride(1),
        stride_bn=b.stride(2), stride_cm=c.stride(0), stride_cn=c.stride(1),
        GATHER=a_index is not None, SCALE=row_scale is not None, DUAL=a2 is not None, E_PAD=_e_pad(num_experts),
        INPUT_PRECISION=_input_precision(a.dtype),
    )
    return c


def gemm_act(x, row_index, offsets, w1, w3, activation: str, save: bool):
    """(act [N, f], h1 [N, f] or None, h3 [N, f] or None): ``act(x[row_index] @ w1[e], x[row_index] @ w3[e])``.

    h1/h3 are the pre-activations (in x's dtype), written only with ``save`` (h3 only for SwiGLU).
    """
    code = ACTIVATION_CODES[activation]
    offsets, row_index = _vector(offsets), _vector(row_index)
    num_rows = row_index.shape[0]
    num_experts, K, M = w1.shape
    if w3 is not None and w3.stride() != w1.stride():
        w3 = w3.contiguous()
        w1 = w1.contiguous()
    act = x.new_empty(num_rows, M)
    h1 = x.new_empty(num_rows, M) if save else None
    h3 = x.new_empty(num_rows, M) if save and code == 0 else None
    if num_rows == 0 or M == 0:
        return act, h1, h3
    if K == 0:
        return act.zero_(), h1 if h1 is None else h1.zero_(), h3 if h3 is None else h3.zero_()
    _launch(
        "gemm_act", "swiglu" if code == 0 else "act", _m_grid(num_rows, num_experts, M),
        x_ptr=x, row_index_ptr=row_index, w1_ptr=w1, w3_ptr=w3 if w3 is not None else w1, act_ptr=act,
        h1_ptr=h1 if h1 is not None else act, h3_ptr=h3 if h3 is not None else act, offsets_ptr=offsets,
        num_rows=num_rows, K=K, M=M, num_experts=num_experts, tune_rows=_tune_rows(num_rows, num_experts),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_we=w1.stride(0), stride_wk=w1.stride(1),
        stride_wn=w1.stride(2), stride_hm=act.stride(0), stride_hn=act.stride(1),
        ACTIVATION=code, SAVE=save, E_PAD=_e_pad(num_experts), INPUT_PRECISION=_input_precision(x.dtype),
    )
    return act, h1, h3


def act_backward_gemm(grad_out, row_index, row_weight, offsets, w2, h1, h3, activation: str, *,
                      need_dh: bool, need_act_w: bool, need_drw: bool):
    """Backward through ``w2``, the row weights and the activation; see :func:`_act_backward_gemm_kernel`.

    Returns ``(dh1, dh3, act_w, drw)``: ``[N, f]`` gradients of the pre-activations (dh3 for SwiGLU
    only), ``row_weight * act`` ``[N, f]``, and the row-weight gradient ``[N]`` in fp32; each None
    when not asked for.
    """
    code = ACTIVATION_CODES[activation]
    offsets, row_index, row_weight = _vector(offsets), _vector(row_index), _vector(row_weight)
    # h1, h3 and the new [N, f] outputs share one set of strides in the kernel.
    h1, h3 = h1.contiguous(), (h3.contiguous() if h3 is not None else None)
    num_rows = row_index.shape[0]
    num_experts, M, K = w2.shape  # w2 [E, f, d] is read as w2[e]^T [d, f]
    w2t = w2.transpose(1, 2)
    dtype = h1.dtype
    dh1 = h1.new_empty(num_rows, M) if need_dh else None
    dh3 = h1.new_empty(num_rows, M) if need_dh and code == 0 else None
    act_w = h1.new_empty(num_rows, M) if need_act_w else None
    # One partial row-weight gradient per column tile, for the narrowest tile any config may use
    # (under the interpreter half its tile, so that the zeroing of unused slots is exercised too).
    min_block_n = (INTERPRET_CONFIG["BLOCK_N"] // 2 if interpreting()
                   else min(c.kwargs["BLOCK_N"] for c in [*ACT_BWD_CONFIGS, DEFAULT_CONFIG["act_bwd"]]))
    slots = max(1, triton.cdiv(M, min_block_n))
    drw = torch.empty(slots, num_rows, device=h1.device, dtype=torch.float32) if need_drw else None
    if num_rows == 0 or M == 0 or not (need_dh or need_act_w or need_drw):
        return dh1, dh3, act_w, (drw.sum(0) if drw is not None else None)
    if grad_out.dtype != dtype:
        grad_out = grad_out.to(dtype)
    placeholder = h1
    _launch(
        "act_backward", "act_bwd", _m_grid(num_rows, num_experts, M),
        g_ptr=grad_out, row_index_ptr=row_index, w2_ptr=w2t, h1_ptr=h1,
        h3_ptr=h3 if h3 is not None else placeholder, row_weight_ptr=row_weight, offsets_ptr=offsets,
        dh1_ptr=dh1 if dh1 is not None else placeholder, dh3_ptr=dh3 if dh3 is not None else placeholder,
        act_w_ptr=act_w if act_w is not None else placeholder, drw_ptr=drw if drw is not None else placeholder,
        num_rows=num_rows, K=K, M=M, num_experts=num_experts, tune_rows=_tune_rows(num_rows, num_experts),
        stride_gm=grad_out.stride(0), stride_gk=grad_out.stride(1), stride_we=w2t.stride(0),
        stride_wk=w2t.stride(1), stride_wn=w2t.stride(2), stride_hm=h1.stride(0), stride_hn=h1.stride(1),
        stride_drw=drw.stride(0) if drw is not None else 0,
        ACTIVATION=code, NEED_DH=need_dh, NEED_ACT_W=need_act_w, NEED_DRW=need_drw, DRW_SLOTS=slots,
        E_PAD=_e_pad(num_experts), INPUT_PRECISION=_input_precision(dtype),
    )
    return dh1, dh3, act_w, (drw.sum(0) if drw is not None else None)


def grouped_xty(x, y, offsets, *, x_index=None, y_index=None, y2=None, out_dtype=None):
    """``out [E, K, N]`` (and ``out2`` with ``y2``): ``X[rows of e]^T @ Y[rows of e]`` per expert.

    Grouped row i reads ``x[x_index[i]]`` (or ``x[i]``) and ``y[y_index[i]]`` (or ``y[i]``); ``y2``
    must have ``y``'s strides. Experts without rows get zeros. Each expert's rows are split into
    row chunks (:func:`xty_chunk_rows`) computed by separate programs; experts of several chunks go
    through an fp32 partial buffer and a fixed-order reduction (see the module docstring).
    """
    offsets, x_index, y_index = _vector(offsets), _vector(x_index), _vector(y_index)
    num_experts = offsets.shape[0]
    K, N = x.shape[1], y.shape[1]
    num_rows = x_index.shape[0] if x_index is not None else (y_index.shape[0] if y_index is not None else x.shape[0])
    out = x.new_empty(num_experts, K, N, dtype=out_dtype or x.dtype)
    out2 = x.new_empty(num_experts, K, N, dtype=out_dtype or x.dtype) if y2 is not None else None
    if num_experts == 0 or K == 0 or N == 0:
        return out, out2
    if num_rows == 0:
        return out.zero_(), (out2.zero_() if out2 is not None else None)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if y2 is not None and (y2.dtype != x.dtype or y2.stride() != y.stride()):
        y2 = y2.to(x.dtype).contiguous()
        y = y.contiguous()

    chunk_rows = xty_chunk_rows(num_rows, num_experts, K, N, _sm_count(x.device))
    # The chunks are the grid's y axis (at most 65535 on CUDA); only a forced tiny chunk gets near it.
    chunk_rows = max(chunk_rows, triton.cdiv(num_rows, max(1, 65535 - num_experts)))
    max_chunks, max_slots = xty_chunk_bounds(num_rows, num_experts, chunk_rows)
    # Empty (a null pointer, never written) when no expert can be split: the kernel's argument types,
    # hence its compiled variant and autotune entry, stay the same either way.
    partial = x.new_empty(max_slots, K, N, dtype=torch.float32)
    partial2 = x.new_empty(max_slots, K, N, dtype=torch.float32) if y2 is not None else partial

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]), max_chunks)

    _launch(
        "xty", "xty_dual" if y2 is not None else "xty", grid,
        x_ptr=x, x_index_ptr=x_index if x_index is not None else offsets, y_ptr=y,
        y2_ptr=y2 if y2 is not None else y, y_index_ptr=y_index if y_index is not None else offsets,
        out_ptr=out, out2_ptr=out2 if out2 is not None else out,
        partial_ptr=partial, partial2_ptr=partial2,
        offsets_ptr=offsets, K=K, N=N, num_experts=num_experts, chunk_rows=chunk_rows,
        tune_rows=_tune_rows(num_rows, num_experts),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_oe=out.stride(0), stride_ok=out.stride(1), stride_on=out.stride(2),
        X_GATHER=x_index is not None, Y_GATHER=y_index is not None, DUAL=y2 is not None, E_PAD=_e_pad(num_experts),
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    if max_slots:
        _reduce_chunks(partial, partial2 if y2 is not None else None, out, out2, offsets, chunk_rows)
    return out, out2


def _reduce_chunks(partial, partial2, out, out2, offsets, chunk_rows: int) -> None:
    """Launch :func:`_xty_chunk_reduce_kernel`: the experts of several chunks get the sum of their partials."""
    num_experts, K, N = out.shape
    size = K * N
    block = 64 if interpreting() else 1024
    kwargs = {} if interpreting() else dict(num_warps=4)
    _xty_chunk_reduce_kernel[(triton.cdiv(size, block),)](
        partial, partial2 if partial2 is not None else partial, out, out2 if out2 is not None else out, offsets,
        num_experts, chunk_rows, size, out.stride(0), DUAL=out2 is not None, E_PAD=_e_pad(num_experts), BLOCK=block,
        **kwargs)


def source_segments(row_index: torch.Tensor, num_sources: int):
    """(order [N], segment starts [num_sources + 1]): grouped rows of each source row, in increasing order.

    A stable sort and a search, all on the device: no host sync.
    """
    sorted_index, order = torch.sort(row_index, stable=True)
    targets = torch.arange(num_sources + 1, device=row_index.device, dtype=sorted_index.dtype)
    return order, torch.searchsorted(sorted_index, targets)


def segment_sum(src, order, segments, num_sources: int, out_dtype=None, rows_per_source: int = 0):
    """``out [num_sources, D]``: ``out[m] = sum of src[order[j]] for j in segments[m]:segments[m+1]`` (fp32 sums).

    With ``rows_per_source = r > 0`` every source has exactly r rows, ``order[m*r : (m+1)*r]``, and
    ``segments`` is not used (may be None).
    """
    D = src.shape[1]
    out = src.new_empty(num_sources, D, dtype=out_dtype or src.dtype)
    if num_sources == 0 or D == 0:
        return out
    if src.shape[0] == 0:
        return out.zero_()
    if src.stride(1) != 1:
        src = src.contiguous()
    block_d = min(triton.next_power_of_2(D), 16 if interpreting() else 1024)
    grid = (num_sources, triton.cdiv(D, block_d))
    kwargs = {} if interpreting() else dict(num_warps=4 if block_d >= 512 else 2)
    if rows_per_source > 0 and order.shape[0] != rows_per_source * num_sources:
        raise ValueError(f"segment_sum: {order.shape[0]} rows are not {rows_per_source} per source for {num_sources} sources")
    _segment_sum_kernel[grid](src, order, segments if rows_per_source <= 0 else order, out, D, src.stride(0),
                              out.stride(0), max(0, rows_per_source), BLOCK_D=block_d, **kwargs)
    return out
