"""The Triton expert kernels as differentiable torch operations.

Public API:

- :func:`triton_usable`: whether the Triton path can run on a tensor.
- :func:`grouped_mm_triton`: ``x [N, K] @ w [E, K, M]`` per expert group (the semantics of
  :func:`kernels.grouped_mm_loop`), differentiable in ``x`` and ``w``.
- :func:`topk_route_triton`: a router's top-k selection, gate weights and per-expert counts from its
  fp32 logits in one kernel (:mod:`kernels.triton_router`), differentiable in the logits.
- :func:`group_by_expert_triton`: a router's T*k choices grouped by expert (a stable counting sort,
  :mod:`kernels.triton_grouping`), differentiable in the gate weights.
- :func:`expert_mlp_triton`: the expert MLP with the gather fused into the first GEMM and the
  weighted scatter-add into the second one's epilogue (the semantics of
  :func:`kernels.expert_mlp_reference`), differentiable in ``x``, ``row_weight``, ``w1``, ``w3``, ``w2``.

Each is registered with ``torch.library`` under ``slimmoe::`` (``custom_op`` + ``register_fake`` +
``register_autograd``, the backward made of more ``slimmoe::`` ops), so ``torch.compile`` traces a
layer that uses them without graph breaks (forward and backward). The same forward and backward are
also plain :class:`torch.autograd.Function` classes (:class:`GroupedMM`, :class:`ExpertMLP` and the
routing ones) that call the ops' bodies directly. The routing and expert-MLP entry points take
those in eager code and the ops only under ``torch.compile``: an op's dispatch (its Python autograd
wrapper, the ``torch.compiler.disable`` frame around its body) costs host time on every call, and a
launch-bound layer makes five such calls per forward and backward.

Every op is functional: it returns new tensors and mutates none of its inputs. Triton is imported
at the first call, never at import time; on CPU the kernels run on the Triton interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before that first call.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

ACTIVATIONS = ("swiglu", "gelu", "relu")


# Whether triton is installed (found without importing it).
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_usable(x: torch.Tensor) -> bool:
    """Triton is importable and ``x`` is on CUDA, or on CPU with ``TRITON_INTERPRET=1`` set."""
    if not _TRITON_IMPORTABLE:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and _interpreting())


def _kernels():
    import kernels.triton_kernels as triton_kernels  # imports triton: only at the first call

    return triton_kernels


def _router():
    import kernels.triton_router as triton_router  # imports triton: only at the first call

    return triton_router


def _grouping():
    import kernels.triton_grouping as triton_grouping  # imports triton: only at the first call

    return triton_grouping


def _require_usable(name: str, x: torch.Tensor) -> None:
    if not triton_usable(x):
        raise RuntimeError(f"{name}: the Triton path needs triton and a CUDA tensor (or a CPU tensor with "
                           f"TRITON_INTERPRET=1); got a {x.device.type} tensor")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for an output nobody asked for (custom ops return tensors only)."""
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# grouped_mm
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("slimmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    _require_usable("slimmoe::grouped_mm", x)
    if w.dtype != x.dtype:
        x = x.to(w.dtype)
    return _kernels().grouped_gemm(x, w, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[2], dtype=w.dtype)


@torch.library.custom_op("slimmoe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[E, K, M]``: ``x[rows of e]^T @ grad_out[rows of e]``; zeros for experts without rows."""
    _require_usable("slimmoe::grouped_mm_weight_grad", x)
    return _kernels().grouped_xty(x, grad_out, offsets)[0]


@_grouped_mm_weight_grad_op.register_fake
def _(x, grad_out, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], grad_out.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad_out):
    x, w, offsets = ctx.saved_tensors
    grad_out = grad_out.to(w.dtype)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.slimmoe.grouped_mm(grad_out, w.transpose(1, 2), offsets).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.slimmoe.grouped_mm_weight_grad(x.to(w.dtype), grad_out, offsets)
    return grad_x, grad_w, None


torch.library.register_autograd("slimmoe::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup)


class GroupedMM(torch.autograd.Function):
    """:func:`grouped_mm_triton` as an autograd Function (same kernels, same backward)."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch.ops.slimmoe.grouped_mm(x, w, offsets)

    @staticmethod
    def backward(ctx, grad_out):
        return _grouped_mm_backward(ctx, grad_out)


def _check_grouped_mm(x, w, offsets):
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm_triton expects x [N, K] and w [E, K, M]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm_triton: x has K={x.shape[1]} columns but w has K={w.shape[1]} rows per expert")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] or offsets.dtype != torch.int32:
        raise ValueError(f"grouped_mm_triton: offsets must be int32 [E={w.shape[0]}], "
                         f"got {offsets.dtype} {tuple(offsets.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm_triton: x is {x.dtype} but w is {w.dtype}")


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out [N, M]``: rows ``offsets[e-1]:offsets[e]`` of ``x [N, K]`` times ``w[e]`` (``w [E, K, M]``).

    One kernel launch for all experts, any group sizes (empty ones included); rows past
    ``offsets[-1]`` give zeros. Differentiable in ``x`` and ``w``.
    """
    _check_grouped_mm(x, w, offsets)
    _require_usable("grouped_mm_triton", x)
    return torch.ops.slimmoe.grouped_mm(x, w, offsets)


# ---------------------------------------------------------------------------------------------
# expert_mlp
# ---------------------------------------------------------------------------------------------


def _sum_at_sources(k, rows: torch.Tensor, row_index: torch.Tensor, source_order: Optional[torch.Tensor],
                    num_sources: int) -> torch.Tensor:
    """``[num_sources, d]``: each source row's grouped rows of ``rows [N, d]`` summed (fp32 sums, a fixed
    order). ``source_order`` (from the dispatcher) names them directly; without it a stable sort of
    ``row_index`` finds them."""
    if source_order is not None:
        return k.segment_sum(rows, source_order, None, num_sources,
                             rows_per_source=source_order.shape[0] // max(1, num_sources))
    order, segments = k.source_segments(row_index, num_sources)
    return k.segment_sum(rows, order, segments, num_sources)


@torch.library.custom_op("slimmoe::expert_mlp", mutates_args=())
def _expert_mlp_op(
    x: torch.Tensor, row_index: torch.Tensor, row_weight: torch.Tensor, offsets: torch.Tensor,
    w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor, activation: str, save: bool,
    source_order: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [M, d], h1 [N, f], h3 [N, f]): h1/h3 are the saved pre-activations (empty unless ``save``;
    h3 only for SwiGLU)."""
    _require_usable("slimmoe::expert_mlp", x)
    return _expert_mlp_forward(x, row_index, row_weight, offsets, w1, w3, w2, activation, save, source_order)


def _expert_mlp_forward(x, row_index, row_weight, offsets, w1, w3, w2, activation, save, source_order):
    """The body of ``slimmoe::expert_mlp`` (the op calls it; so does :class:`ExpertMLP`, without the
    op's dispatch)."""
    k = _kernels()
    act, h1, h3 = k.gemm_act(x, row_index, offsets, w1, w3, activation, save)  # act [N, f]
    y = k.grouped_gemm(act, w2, offsets, row_scale=row_weight)  # [N, d], weighted, one row per assignment
    del act
    out = _sum_at_sources(k, y, row_index, source_order, x.shape[0])
    return out, (h1 if h1 is not None else _empty(x)), (h3 if h3 is not None else _empty(x))


@_expert_mlp_op.register_fake
def _(x, row_index, row_weight, offsets, w1, w3, w2, activation, save, source_order=None):
    num_rows, ffn = row_index.shape[0], w1.shape[2]
    h1 = x.new_empty(num_rows, ffn) if save else _empty(x)
    h3 = x.new_empty(num_rows, ffn) if save and activation == "swiglu" else _empty(x)
    return torch.empty_like(x), h1, h3


@torch.library.custom_op("slimmoe::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, row_index: torch.Tensor, row_weight: torch.Tensor,
    offsets: torch.Tensor, w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor,
    h1: torch.Tensor, h3: torch.Tensor, activation: str, needs: list[bool],
    source_order: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, row_weight, w1, w3, w2); an empty tensor for each one ``needs`` does not ask for."""
    _require_usable("slimmoe::expert_mlp_backward", x)
    return _expert_mlp_grads(grad_out, x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, activation, needs,
                             source_order)


def _expert_mlp_grads(grad_out, x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, activation, needs,
                      source_order):
    """The body of ``slimmoe::expert_mlp_backward``."""
    k = _kernels()
    need_x, need_rw, need_w1, need_w3, need_w2 = needs
    swiglu = activation == "swiglu"
    need_w3 = need_w3 and swiglu
    grad_out = grad_out.to(x.dtype)
    dh1, dh3, act_w, drw = k.act_backward_gemm(
        grad_out, row_index, row_weight, offsets, w2, h1, h3 if swiglu else None, activation,
        need_dh=need_x or need_w1 or need_w3, need_act_w=need_w2, need_drw=need_rw)
    grad_w2 = k.grouped_xty(act_w, grad_out, offsets, y_index=row_index)[0] if need_w2 else _empty(w2)
    del act_w
    grad_w1, grad_w3 = _empty(w1), _empty(w1)
    if need_w1 and need_w3:  # one pass over the gathered x for both weight gradients
        grad_w1, grad_w3 = k.grouped_xty(x, dh1, offsets, x_index=row_index, y2=dh3)
    elif need_w1:
        grad_w1 = k.grouped_xty(x, dh1, offsets, x_index=row_index)[0]
    elif need_w3:
        grad_w3 = k.grouped_xty(x, dh3, offsets, x_index=row_index)[0]
    grad_x = _empty(x)
    if need_x:
        w1t = w1.transpose(1, 2)
        w3t = w3.transpose(1, 2) if swiglu else None
        if swiglu and w3t.stride() != w1t.stride():
            w1t, w3t = w1t.contiguous(), w3t.contiguous()
        grad_rows = k.grouped_gemm(dh1, w1t, offsets, a2=dh3, b2=w3t)  # [N, d], one row per assignment
        grad_x = _sum_at_sources(k, grad_rows, row_index, source_order, x.shape[0])
    grad_rw = drw.to(row_weight.dtype) if need_rw else _empty(row_weight)
    return grad_x, grad_rw, grad_w1, grad_w3, grad_w2


@_expert_mlp_backward_op.register_fake
def _(grad_out, x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, activation, needs, source_order=None):
    need_x, need_rw, need_w1, need_w3, need_w2 = needs
    return (
        torch.empty_like(x) if need_x else _empty(x),
        torch.empty_like(row_weight) if need_rw else _empty(row_weight),
        torch.empty_like(w1) if need_w1 else _empty(w1),
        torch.empty_like(w1) if need_w3 and activation == "swiglu" else _empty(w1),
        torch.empty_like(w2) if need_w2 else _empty(w2),
    )


def _expert_mlp_setup(ctx, inputs, output):
    x, row_index, row_weight, offsets, w1, w3, w2, activation, save, *rest = inputs
    _, h1, h3 = output
    ctx.activation = activation
    ctx.saved_activations = save
    ctx.save_for_backward(x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, rest[0] if rest else None)
    ctx.mark_non_differentiable(h1, h3)
    ctx.set_materialize_grads(False)


def _expert_mlp_backward(ctx, grad_out, *_unused_grads):
    """Gradients for (x, row_index, row_weight, offsets, w1, w3, w2, activation[, save, source_order])."""
    return _expert_mlp_input_grads(ctx, grad_out, torch.ops.slimmoe.expert_mlp_backward)


def _expert_mlp_input_grads(ctx, grad_out, grads_fn):
    """The autograd backward, with ``grads_fn`` the backward op or its body."""
    x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, source_order = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in (0, 2, 4, 5, 6)]
    if grad_out is None or not any(needs):
        return (None,) * len(ctx.needs_input_grad)
    if not ctx.saved_activations:
        raise RuntimeError("slimmoe::expert_mlp was called with save=False, so it cannot be differentiated")
    grads = grads_fn(grad_out, x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, ctx.activation, needs,
                     source_order)
    grad_x, grad_rw, grad_w1, grad_w3, grad_w2 = (g if need else None for g, need in zip(grads, needs))
    return (grad_x, None, grad_rw, None, grad_w1, grad_w3, grad_w2, None, None, None)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("slimmoe::expert_mlp", _expert_mlp_backward, setup_context=_expert_mlp_setup)


class ExpertMLP(torch.autograd.Function):
    """:func:`expert_mlp_triton` as an autograd Function: the op's forward and backward bodies called
    directly, which is how eager code runs them (a ``torch.library`` op's dispatch costs host time on
    every call; ``torch.compile`` traces the op instead)."""

    @staticmethod
    def forward(ctx, x, row_index, row_weight, offsets, w1, w3, w2, activation, source_order=None):
        save = any(ctx.needs_input_grad)
        out, h1, h3 = _expert_mlp_forward(x, row_index, row_weight, offsets, w1, w3, w2, activation, save,
                                          source_order)
        ctx.activation = activation
        ctx.saved_activations = save
        ctx.save_for_backward(x, row_index, row_weight, offsets, w1, w3, w2, h1, h3, source_order)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _expert_mlp_input_grads(ctx, grad_out, _expert_mlp_grads)


def _check_expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation, source_order=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_mlp_triton: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if (w3 is None) == (activation == "swiglu"):
        raise ValueError("expert_mlp_triton: w3 is required for swiglu and must be None otherwise")
    if x.dim() != 2 or row_index.dim() != 1 or row_index.shape != row_weight.shape:
        raise ValueError(f"expert_mlp_triton: expects x [M, d], row_index [N], row_weight [N]; got x {tuple(x.shape)}, "
                         f"row_index {tuple(row_index.shape)}, row_weight {tuple(row_weight.shape)}")
    E, d, f = w1.shape
    if x.shape[1] != d or w2.shape != (E, f, d) or (w3 is not None and w3.shape != w1.shape):
        raise ValueError(f"expert_mlp_triton: shapes do not fit: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"w3 {None if w3 is None else tuple(w3.shape)}, w2 {tuple(w2.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] != E or offsets.dtype != torch.int32:
        raise ValueError(f"expert_mlp_triton: offsets must be int32 [E={E}], got {offsets.dtype} {tuple(offsets.shape)}")
    if row_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_mlp_triton: row_index must be int64 (or int32), got {row_index.dtype}")
    if any(w is not None and w.dtype != x.dtype for w in (w1, w3, w2)):
        raise ValueError(f"expert_mlp_triton: x is {x.dtype} but the expert weights are {w1.dtype}")
    _check_source_order(source_order, row_index, x.shape[0], "expert_mlp_triton")


def _check_source_order(source_order, row_index, num_sources: int, who: str) -> None:
    """``source_order [N]`` (integer, like ``row_index``) is r grouped rows per source row, ``N = r * M``."""
    if source_order is None:
        return
    if source_order.dim() != 1 or source_order.shape != row_index.shape or source_order.dtype not in (torch.int32,
                                                                                                     torch.int64):
        raise ValueError(f"{who}: source_order must be int64 (or int32) [N={row_index.shape[0]}], got "
                         f"{source_order.dtype} {tuple(source_order.shape)}")
    rows = source_order.shape[0]
    if (num_sources == 0 and rows) or (num_sources and rows % num_sources):
        raise ValueError(f"{who}: source_order needs the same number of grouped rows per source row; "
                         f"{rows} rows do not divide among {num_sources} source rows")


def expert_mlp_triton(x, row_index, row_weight, offsets, w1, w3, w2, activation: str = "swiglu",
                      source_order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out [M, d]``: ``out[m] = sum over i with row_index[i] = m of row_weight[i] * expert_i(x[m])``.

    The semantics of :func:`kernels.expert_mlp_reference`: ``x [M, d]``, ``row_index [N]`` (grouped
    rows sorted by expert), ``row_weight [N]``, ``offsets [E]`` int32, ``w1 [E, d, f]``, ``w3 [E, d, f]``
    (SwiGLU only, else None), ``w2 [E, f, d]``. Differentiable in ``x``, ``row_weight`` and the
    weights; the pre-activations are saved only when a gradient can be needed.

    ``source_order [N]`` (optional): the grouped rows of each source row, ``r = N / M`` per row:
    ``row_index[source_order[m * r + j]] == m`` for ``j < r`` (what a dispatcher knows when every
    token keeps its k assignments: the inverse of its sort). With it the results are summed at their
    source rows without sorting ``row_index`` again, in forward and in backward; the sums are the
    same, in a possibly different order of the r terms. Its consistency with ``row_index`` is the
    caller's promise (checking it would cost a host sync).
    """
    _check_expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation, source_order)
    _require_usable("expert_mlp_triton", x)
    if not torch.compiler.is_compiling():  # eager: the same bodies without the op's dispatch
        return ExpertMLP.apply(x, row_index, row_weight, offsets, w1, w3, w2, activation, source_order)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, row_weight, w1, w3, w2))
    out, _, _ = torch.ops.slimmoe.expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation, save,
                                             source_order)
    return out


# ---------------------------------------------------------------------------------------------
# group_by_expert
# ---------------------------------------------------------------------------------------------

# The most experts the grouping kernels take (their last program reads all E group ends at once);
# a model with more keeps the argsort path.
GROUPING_MAX_EXPERTS = 1024


@torch.library.custom_op("slimmoe::group_by_expert", mutates_args=())
def _group_by_expert_op(indices: torch.Tensor, weights: torch.Tensor,
                        num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_index [S] int64, row_weight [S], source_order [S] int64, offsets [E] int32) for S = T*k."""
    _require_usable("slimmoe::group_by_expert", indices)
    return _grouping().group_by_expert(indices, weights, num_experts)


@_group_by_expert_op.register_fake
def _(indices, weights, num_experts):
    slots = indices.numel()
    return (indices.new_empty(slots, dtype=torch.int64), weights.new_empty(slots),
            indices.new_empty(slots, dtype=torch.int64), indices.new_empty(num_experts, dtype=torch.int32))


def _group_by_expert_setup(ctx, inputs, output):
    _, weights, _ = inputs
    row_index, _, source_order, offsets = output
    ctx.weights_shape = weights.shape
    ctx.save_for_backward(source_order)
    ctx.mark_non_differentiable(row_index, source_order, offsets)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the integer outputs


def _group_by_expert_backward(ctx, grad_row_index, grad_row_weight, grad_source_order, grad_offsets):
    """The grouped weights are a permutation of the slots' weights: slot s's gradient is that of its
    grouped row ``source_order[s]`` (one gather)."""
    if grad_row_weight is None:
        return None, None, None
    (source_order,) = ctx.saved_tensors
    return None, grad_row_weight.index_select(0, source_order).view(ctx.weights_shape), None


torch.library.register_autograd("slimmoe::group_by_expert", _group_by_expert_backward,
                                setup_context=_group_by_expert_setup)


class _GroupByExpert(torch.autograd.Function):
    """Eager ``slimmoe::group_by_expert``: the op's body and autograd without its dispatch."""

    @staticmethod
    def forward(ctx, indices, weights, num_experts):
        output = _grouping().group_by_expert(indices, weights, num_experts)
        _group_by_expert_setup(ctx, (indices, weights, num_experts), output)
        return output

    backward = staticmethod(_group_by_expert_backward)


def group_by_expert_triton(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """A router's choices ``indices [T, k]`` (ids in ``0..num_experts-1``, not checked: that would cost
    a host sync) with gate ``weights [T, k]``, grouped by expert as a stable argsort of the flattened
    ids groups them: ``(row_index [T*k] int64, row_weight [T*k], source_order [T*k] int64, offsets [E]
    int32)``, where grouped row i is slot ``order[i]`` (token ``order[i] // k``), ``source_order`` is the
    inverse of ``order`` and ``offsets`` the cumulative group ends. Differentiable in ``weights``."""
    if indices.dim() != 2 or weights.shape != indices.shape:
        raise ValueError(f"group_by_expert_triton: expects indices [T, k] and weights [T, k]; got indices "
                         f"{tuple(indices.shape)}, weights {tuple(weights.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_by_expert_triton: indices must be int64 (or int32), got {indices.dtype}")
    if not 1 <= num_experts <= GROUPING_MAX_EXPERTS:
        raise ValueError(f"group_by_expert_triton: num_experts={num_experts}; the kernels take 1..{GROUPING_MAX_EXPERTS}")
    if weights.device != indices.device:
        raise ValueError(f"group_by_expert_triton: indices on {indices.device} but weights on {weights.device}")
    _require_usable("group_by_expert_triton", indices)
    if not torch.compiler.is_compiling():
        return _GroupByExpert.apply(indices, weights, num_experts)
    return torch.ops.slimmoe.group_by_expert(indices, weights, num_experts)


# ---------------------------------------------------------------------------------------------
# topk_route
# ---------------------------------------------------------------------------------------------

ROUTING_MAX_EXPERTS = 1024  # the router kernel holds a token's whole logits row (E rounded up to a power of 2)
SCORE_FUNCTIONS = ("softmax", "sigmoid")


@torch.library.custom_op("slimmoe::topk_route", mutates_args=())
def _topk_route_op(logits: torch.Tensor, top_k: int, bias: Optional[torch.Tensor], score: str,
                   normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [T, k] int64, weights [T, k] fp32, counts [E] int64)."""
    _require_usable("slimmoe::topk_route", logits)
    return _router().topk_route(logits, top_k, bias, score, normalize)


@_topk_route_op.register_fake
def _(logits, top_k, bias, score, normalize):
    tokens, experts = logits.shape
    return (logits.new_empty(tokens, top_k, dtype=torch.int64), logits.new_empty(tokens, top_k, dtype=torch.float32),
            logits.new_empty(experts, dtype=torch.int64))


@torch.library.custom_op("slimmoe::topk_route_backward", mutates_args=())
def _topk_route_backward_op(grad_weights: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
                            weights: torch.Tensor, score: str, normalize: bool) -> torch.Tensor:
    """``[T, E]`` fp32: the logits' gradient."""
    _require_usable("slimmoe::topk_route_backward", logits)
    return _router().topk_route_backward(grad_weights, logits, indices, weights, score, normalize)


@_topk_route_backward_op.register_fake
def _(grad_weights, logits, indices, weights, score, normalize):
    return torch.empty_like(logits, dtype=torch.float32)


def _topk_route_setup(ctx, inputs, output):
    logits, _, _, score, normalize = inputs
    indices, weights, counts = output
    ctx.score, ctx.normalize = score, normalize
    ctx.save_for_backward(logits, indices, weights)
    ctx.mark_non_differentiable(indices, counts)
    ctx.set_materialize_grads(False)


def _topk_route_backward(ctx, grad_indices, grad_weights, grad_counts):
    return _topk_route_input_grads(ctx, grad_weights, torch.ops.slimmoe.topk_route_backward)


def _topk_route_input_grads(ctx, grad_weights, backward_fn):
    """Gradients for (logits, top_k, bias, score, normalize), with ``backward_fn`` the backward op or its body."""
    if grad_weights is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    logits, indices, weights = ctx.saved_tensors
    return backward_fn(grad_weights, logits, indices, weights, ctx.score, ctx.normalize), None, None, None, None


torch.library.register_autograd("slimmoe::topk_route", _topk_route_backward, setup_context=_topk_route_setup)


class _TopkRoute(torch.autograd.Function):
    """Eager ``slimmoe::topk_route``: the op's body and autograd without its dispatch."""

    @staticmethod
    def forward(ctx, logits, top_k, bias, score, normalize):
        output = _router().topk_route(logits, top_k, bias, score, normalize)
        _topk_route_setup(ctx, (logits, top_k, bias, score, normalize), output)
        return output

    @staticmethod
    def backward(ctx, grad_indices, grad_weights, grad_counts):
        return _topk_route_input_grads(ctx, grad_weights, _router().topk_route_backward)


def topk_route_triton(logits: torch.Tensor, top_k: int, bias: Optional[torch.Tensor] = None, score: str = "softmax",
                      normalize: bool = True):
    """A router's selection from fp32 ``logits [T, E]``: ``(indices [T, k] int64, weights [T, k] fp32,
    counts [E] int64)``.

    Scores are ``softmax(logits)`` or ``sigmoid(logits)`` (``score``); the k experts with the highest
    ``score + bias`` (``bias [E]`` fp32, optional; it steers the choice and nothing else) are chosen,
    best first; their weights are their scores, divided by the k scores' sum with ``normalize`` (for
    softmax: the softmax over the k chosen logits); ``counts`` are the choices per expert.
    Differentiable in ``logits`` (the weights' gradient; the indices and counts are not differentiable).
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"topk_route_triton: expects fp32 logits [T, E]; got {logits.dtype} {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if not 1 <= num_experts <= ROUTING_MAX_EXPERTS:
        raise ValueError(f"topk_route_triton: {num_experts} experts; the kernel takes 1..{ROUTING_MAX_EXPERTS}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"topk_route_triton: top_k={top_k!r} must be an integer in 1..{num_experts}")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"topk_route_triton: unknown score {score!r}; expected one of {SCORE_FUNCTIONS}")
    if bias is not None and (bias.shape != (num_experts,) or bias.dtype != torch.float32
                             or bias.device != logits.device):
        raise ValueError(f"topk_route_triton: bias must be fp32 [{num_experts}] on {logits.device}; got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    _require_usable("topk_route_triton", logits)
    if not torch.compiler.is_compiling():
        return _TopkRoute.apply(logits, top_k, bias, score, bool(normalize))
    return torch.ops.slimmoe.topk_route(logits, top_k, bias, score, bool(normalize))
