"""The expert MLP with the token gather and the weighted scatter fused in.

Inputs (E experts, N grouped rows, M source rows):

- ``x [M, d]``: the rows the experts read, in any order (a layer's tokens, or the rows received
  from other ranks);
- ``row_index [N]`` int64: grouped row i reads ``x[row_index[i]]`` and adds its result to
  ``out[row_index[i]]``; the grouped rows are sorted by expert;
- ``row_weight [N]``: the gate weight that scales grouped row i's expert output;
- ``offsets [E]`` int32: cumulative end of each expert's group (as ``F.grouped_mm``'s ``offs``);
- ``w1 [E, d, f]``, ``w3 [E, d, f]`` (SwiGLU only, else None), ``w2 [E, f, d]``.

Output ``out [M, d]``: ``out[m] = sum over i with row_index[i] = m of row_weight[i] * expert_i(x[m])``
where ``expert(v) = act(v @ w1[e]) @ w2[e]`` and SwiGLU's ``act = silu(v @ w1[e]) * (v @ w3[e])``.

Backends:

- "auto" (the default): the path measured fastest for the inputs, chosen from their device, dtype
  and shapes alone (never a host sync): see :func:`choose_backend`.
- "gather": one slice of each weight per grouped row (``w1[expert of row]``), batched matrix-vector
  products, weighted ``index_add``; autograd does the backward. Memory grows with rows times the
  expert size, so it is for a few rows (decoding), where it is the one CPU path ``torch.compile``
  traces without a graph break.
- "loop": :func:`expert_mlp_reference`: gather, three :func:`~kernels.grouped_mm` calls, torch
  activations, weighted ``index_add``, all differentiated by autograd. The readable definition.
- "triton" (the default): on CUDA, the Triton kernels of :mod:`kernels.triton_ops` (gather fused
  into the first GEMM, weighted scatter into the second's epilogue); elsewhere "torch", silently.
- "torch": on CPU with fp32 tensors, :class:`_ExtensionExpertMLP`, the C++ kernel of
  ``kernels/csrc/expert_mlp_cpu.cpp`` (built on first use by :mod:`kernels.cpu_extension`): per
  expert, gather -> GEMM -> one fused activation-and-weight pass -> GEMM -> scatter-add, and a
  hand-written backward in the same order. When the experts can be dealt out to the threads,
  largest first, with no thread getting more than 1.15x its share of the rows (and the per-thread
  ``[M, d]`` accumulators fit), each thread runs whole experts with single-threaded GEMMs;
  otherwise the experts run in turn with every GEMM on all threads. Which thread runs which
  expert follows from the row counts alone, so results are bitwise reproducible at a given
  thread count. Other CPU dtypes, or a machine where the
  extension cannot be built, take :class:`_BlockedExpertMLP`: the same algorithm in Python, one
  cache-sized block of experts at a time. Both never materialise ``[N, d]`` intermediates, recompute
  the activation in backward rather than saving it, and write each weight gradient into the storage
  of the one returned the step before once nothing holds it. On other devices the reference with
  ``F.grouped_mm``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from kernels import cpu_extension
from kernels.grouped_mm import grouped_mm, triton_on_cpu

ACTIVATIONS = ("swiglu", "gelu", "relu")
EXPERT_BACKENDS = ("auto", "triton", "torch", "loop", "gather")

# backend="auto" on CUDA, from the H100 measurements of issue 17 (bf16, forward+backward, uniform
# routing, `moe bench kernels`): where every expert's GEMMs are large (d and f both >= 4096) and
# well fed (>= 1024 rows per expert on average), torch's F.grouped_mm beat the Triton kernels
# (584 vs 417 TFLOP/s at d=4096, f=14336, E=8, k=2); with fine-grained experts the Triton kernels,
# which fuse the gather and the weighted scatter, won (384 vs 328 at d=2048, f=1408, E=64; 258 vs
# 175 at d=1024, f=512, E=128). `moe bench kernels` prints which path "auto" takes per shape.
GROUPED_MM_MIN_WIDTH = 4096
GROUPED_MM_MIN_ROWS_PER_EXPERT = 1024
# backend="auto" on CPU under torch.compile: "gather" while its gathered weights stay this small.
GATHER_MAX_BYTES = 32 << 20


def choose_backend(device_type: str, num_rows: int, num_experts: int, hidden: int, ffn: int, element_size: int,
                   swiglu: bool, grouped_mm_supported: bool, compiling: bool) -> str:
    """The backend ``"auto"`` takes: a pure function of the inputs' kind and shapes.

    CUDA: "torch" (F.grouped_mm) for large, well-fed experts where F.grouped_mm supports the
    inputs, else "triton". Elsewhere: "gather" under ``torch.compile`` for a few rows (it traces
    without a graph break, so a decode step compiles with ``fullgraph=True``), else "torch" (the
    C++ CPU kernel).
    """
    if device_type == "cuda":
        large = min(hidden, ffn) >= GROUPED_MM_MIN_WIDTH
        fed = num_rows >= GROUPED_MM_MIN_ROWS_PER_EXPERT * num_experts
        return "torch" if grouped_mm_supported and large and fed else "triton"
    gathered_bytes = num_rows * hidden * ffn * (3 if swiglu else 2) * element_size
    if compiling and gathered_bytes <= GATHER_MAX_BYTES:
        return "gather"
    return "torch"


def _auto_backend(x, row_index, w1, w3) -> str:
    from kernels.grouped_mm import _torch_grouped_mm_supported

    num_experts, hidden, ffn = w1.shape
    if not x.is_cuda and triton_on_cpu():  # asked for the Triton kernels in the interpreter
        return "triton"
    return choose_backend(
        x.device.type, row_index.shape[0], num_experts, hidden, ffn, x.element_size(), w3 is not None,
        _torch_grouped_mm_supported(x, w1) if x.is_cuda else False, torch.compiler.is_compiling(),
    )


def expert_mlp_gathered(x, row_index, row_weight, offsets, w1, w3, w2, activation="swiglu"):
    """Backend "gather": each grouped row multiplies its own expert's weight slices (gathered);
    rows past ``offsets[-1]`` belong to no expert and add nothing. Fixed shapes, no host sync."""
    num_rows = row_index.shape[0]
    positions = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets, positions, right=True)  # [N]: the group each row falls in
    in_group = expert < w1.shape[0]
    expert = expert.clamp_max(w1.shape[0] - 1).to(x.device)
    rows = x.index_select(0, row_index).unsqueeze(1)  # [N, 1, d]
    h1 = torch.bmm(rows, w1.index_select(0, expert))  # [N, 1, f]
    h3 = torch.bmm(rows, w3.index_select(0, expert)) if w3 is not None else None
    y = torch.bmm(activate(activation, h1, h3), w2.index_select(0, expert)).squeeze(1)  # [N, d]
    weight = torch.where(in_group.to(x.device), row_weight, torch.zeros_like(row_weight))
    y = y * weight.to(y.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, row_index, y)


def activate(activation: str, h1: torch.Tensor, h3):
    """The expert activation of `h1 = x @ w1` (SwiGLU: `silu(h1) * h3`, with `h3 = x @ w3`)."""
    if activation == "swiglu":
        return F.silu(h1) * h3
    if activation == "gelu":
        return F.gelu(h1)
    return F.relu(h1)


def expert_mlp_reference(x, row_index, row_weight, offsets, w1, w3, w2, activation="swiglu", backend="loop"):
    """Unfused definition; autograd does the backward."""
    grouped = x.index_select(0, row_index)  # [N, d]
    hidden = grouped_mm(grouped, w1, offsets, backend=backend)  # [N, f]
    h3 = grouped_mm(grouped, w3, offsets, backend=backend) if activation == "swiglu" else None
    y = grouped_mm(activate(activation, hidden, h3), w2, offsets, backend=backend)  # [N, d]
    y = y * row_weight.to(y.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, row_index, y)


# Consecutive experts are processed together until a block holds about BLOCK_BYTES of hidden
# activations: GEMMs still run per expert, but the gather, activation, weighting and scatter run
# once per block, which keeps the block in cache and the number of small ops low when experts are
# many and small.
BLOCK_BYTES = 4 << 20


def _block_rows(x: torch.Tensor, ffn: int) -> int:
    return max(256, BLOCK_BYTES // (x.element_size() * ffn))


def _blocks(offsets: torch.Tensor, block_rows: int):
    """(start, end, [(expert, start, end), ...]) of consecutive non-empty experts."""
    block, block_start, start = [], 0, 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            if not block:
                block_start = start
            block.append((expert, start, end))
            if end - block_start >= block_rows:
                yield block_start, end, block
                block = []
        start = end
    if block:
        yield block_start, block[-1][2], block


# The storage of the last weight gradient the CPU kernel returned, per weight (held weakly: an entry
# goes with its weight). Once nothing else holds that storage (the optimizer step is done and the
# gradient was set to None, or it was summed into an existing .grad), the next backward writes into
# it again instead of allocating: E experts' gradients are large, and glibc serves an allocation of
# 32 MiB or more with a fresh mmap, so a new buffer every step costs a page fault per 4 KiB page
# (three 32 MiB gradients at d=512, f=1024, E=16). The returned tensor is the only
# tensor on the storage, so autograd still takes it as .grad without a copy. Holds one gradient's
# memory per expert weight between steps; release_gradient_buffers() frees it.
_GRADIENT_BUFFERS = WeakIdKeyDictionary()
_GRADIENT_BUFFERS_LOCK = threading.Lock()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # a torch without it: always allocate


def release_gradient_buffers() -> None:
    """Drop the weight-gradient storages the CPU kernel keeps for reuse (their memory is freed once
    no gradient still uses it)."""
    with _GRADIENT_BUFFERS_LOCK:
        _GRADIENT_BUFFERS.clear()


def _new_weight_grad(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``weight``: the previous gradient's storage when nothing uses it."""
    if not weight.is_contiguous() or _storage_use_count is None:
        return torch.empty_like(weight)
    with _GRADIENT_BUFFERS_LOCK:
        storage = _GRADIENT_BUFFERS.get(weight)
        if (
            storage is not None
            and storage.device == weight.device
            and storage.nbytes() == weight.numel() * weight.element_size()
            and _storage_use_count(storage._cdata) == 1  # held by this table alone
        ):
            return weight.new_empty(0).set_(storage, 0, weight.shape, weight.stride())
        grad = torch.empty_like(weight)
        _GRADIENT_BUFFERS[weight] = grad.untyped_storage()
        return grad


def _weight_grad(weight: torch.Tensor, empty_experts: list[int]) -> torch.Tensor:
    """Gradient buffer: left uninitialised where a GEMM will write it, zero for experts without rows."""
    grad = _new_weight_grad(weight)
    for expert in empty_experts:
        grad[expert].zero_()
    return grad


def _activation_backward(activation: str, grad_act: torch.Tensor, h1: torch.Tensor, h3, silu_h1=None):
    """(grad h1, grad h3 or None) from the gradient of act(h1[, h3])."""
    if activation == "swiglu":
        return torch.ops.aten.silu_backward(grad_act * h3, h1), grad_act * silu_h1
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_act, h1), None
    return grad_act * (h1 > 0), None


class _BlockedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_index, row_weight, offsets, w1, w3, w2, activation):
        swiglu = activation == "swiglu"
        num_rows, ffn = row_index.shape[0], w1.shape[2]
        h1_all = x.new_empty(num_rows, ffn)  # saved for backward
        h3_all = x.new_empty(num_rows, ffn) if swiglu else None
        out = torch.zeros_like(x)
        weight = row_weight.to(x.dtype).unsqueeze(1)  # [N, 1]
        for bs, bt, experts in _blocks(offsets, _block_rows(x, w1.shape[2])):
            rows = row_index[bs:bt]
            block = x.index_select(0, rows)  # [n, d]
            for e, s, t in experts:
                torch.mm(block[s - bs : t - bs], w1[e], out=h1_all[s:t])
                if swiglu:
                    torch.mm(block[s - bs : t - bs], w3[e], out=h3_all[s:t])
            act = activate(activation, h1_all[bs:bt], None if h3_all is None else h3_all[bs:bt])
            act.mul_(weight[bs:bt])  # [n, f]
            y = block  # reuse the gathered block's memory for the output, [n, d]
            for e, s, t in experts:
                torch.mm(act[s - bs : t - bs], w2[e], out=y[s - bs : t - bs])
            out.index_add_(0, rows, y)
        ctx.activation = activation
        ctx.save_for_backward(x, row_index, row_weight, offsets, w1, w3, w2, h1_all, h3_all)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, row_index, row_weight, offsets, w1, w3, w2, h1_all, h3_all = ctx.saved_tensors
        activation = ctx.activation
        need_x, _, need_weight, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:7]
        grad_out = grad_out.contiguous()
        weight = row_weight.to(x.dtype).unsqueeze(1)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_row_weight = torch.empty_like(row_weight) if need_weight else None
        blocks = list(_blocks(offsets, _block_rows(x, w1.shape[2])))
        busy = {e for _, _, experts in blocks for e, _, _ in experts}
        empty = [e for e in range(w1.shape[0]) if e not in busy]
        grad_w1 = _weight_grad(w1, empty) if need_w1 else None
        grad_w3 = _weight_grad(w3, empty) if need_w3 else None
        grad_w2 = _weight_grad(w2, empty) if need_w2 else None
        for bs, bt, experts in blocks:
            rows = row_index[bs:bt]
            h1 = h1_all[bs:bt]
            h3 = None if h3_all is None else h3_all[bs:bt]
            silu_h1 = F.silu(h1) if h3 is not None else None
            act = silu_h1 * h3 if h3 is not None else activate(activation, h1, None)  # unweighted, [n, f]
            grad_y = grad_out.index_select(0, rows)  # [n, d]: gradient of the block's weighted output
            grad_act = torch.empty_like(act)  # d loss / d (weight * act)
            for e, s, t in experts:
                torch.mm(grad_y[s - bs : t - bs], w2[e].t(), out=grad_act[s - bs : t - bs])
            if need_weight:
                grad_row_weight[bs:bt] = torch.linalg.vecdot(grad_act, act).to(row_weight.dtype)
            if need_w2:
                act.mul_(weight[bs:bt])
                for e, s, t in experts:
                    torch.mm(act[s - bs : t - bs].t(), grad_y[s - bs : t - bs], out=grad_w2[e])
            del act
            grad_h1, grad_h3 = _activation_backward(activation, grad_act.mul_(weight[bs:bt]), h1, h3, silu_h1)
            del grad_act, silu_h1
            block = x.index_select(0, rows) if (need_w1 or need_w3) else None  # [n, d]
            grad_block = grad_y if need_x else None  # reuse grad_y's memory, [n, d]
            for e, s, t in experts:
                r = slice(s - bs, t - bs)
                if need_x:
                    torch.mm(grad_h1[r], w1[e].t(), out=grad_block[r])
                    if grad_h3 is not None:  # both branches' input gradient in one accumulation
                        grad_block[r].addmm_(grad_h3[r], w3[e].t())
                if need_w1:
                    torch.mm(block[r].t(), grad_h1[r], out=grad_w1[e])
                if need_w3:
                    torch.mm(block[r].t(), grad_h3[r], out=grad_w3[e])
            if need_x:
                grad_x.index_add_(0, rows, grad_block)
        return grad_x, None, grad_row_weight, None, grad_w1, grad_w3, grad_w2, None


# The C++ kernel's work unit: a run of at most this many bytes of one expert's [rows, max(d, f)]
# activations (at least 256 rows); and how its threads share the units (-1: the kernel chooses,
# 1: whole units per thread, 0: one unit after another with every GEMM on all threads).
CHUNK_BYTES = 16 << 20
UNIT_PARALLEL = -1


def _chunk_rows(x: torch.Tensor, w1: torch.Tensor) -> int:
    return max(256, CHUNK_BYTES // (x.element_size() * max(x.shape[1], w1.shape[2])))


class _ExtensionExpertMLP(torch.autograd.Function):
    """:class:`_BlockedExpertMLP`'s algorithm in C++ (``kernels/csrc/expert_mlp_cpu.cpp``), with the
    threads running whole experts side by side when that keeps them evenly loaded."""

    @staticmethod
    def forward(ctx, x, row_index, row_weight, offsets, w1, w3, w2, activation):
        weight = row_weight.to(x.dtype).contiguous()
        x, row_index, offsets, w1, w2 = (t.contiguous() for t in (x, row_index, offsets, w1, w2))
        w3 = None if w3 is None else w3.contiguous()
        ctx.code, ctx.chunk_rows, ctx.weight_dtype = ACTIVATIONS.index(activation), _chunk_rows(x, w1), row_weight.dtype
        out, h1, h3 = cpu_extension.load().forward(
            x, row_index, weight, offsets, w1, w3, w2, ctx.code, ctx.chunk_rows, UNIT_PARALLEL
        )
        ctx.save_for_backward(x, row_index, weight, offsets, w1, w3, w2, h1, h3)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, row_index, weight, offsets, w1, w3, w2, h1, h3 = ctx.saved_tensors
        need_x, _, need_weight, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:7]
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        empty = [e for e, count in enumerate(counts) if count <= 0]
        grads = [_weight_grad(w, empty) if need else None for w, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2))]
        grad_x, grad_weight = cpu_extension.load().backward(
            grad_out.contiguous(), x, row_index, weight, offsets, w1, w3, w2, h1, h3, ctx.code, need_x, need_weight,
            *grads, ctx.chunk_rows, UNIT_PARALLEL,
        )
        return (
            grad_x if need_x else None, None, grad_weight.to(ctx.weight_dtype) if need_weight else None, None, *grads, None
        )


@torch.compiler.disable
def _cpu_expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation):
    """The CPU "torch" path: the C++ kernel where it applies, else the blocked Python one. Runs
    eagerly under ``torch.compile``: neither is a ``torch.library`` op (and loading the extension
    takes a lock), so the graph breaks here once, without a warning."""
    if _extension_applies(x, row_index, offsets, w1, w3, w2):
        return _ExtensionExpertMLP.apply(x, row_index, row_weight, offsets, w1, w3, w2, activation)
    return _BlockedExpertMLP.apply(x, row_index, row_weight, offsets, w1, w3, w2, activation)


def _extension_applies(x, row_index, offsets, w1, w3, w2) -> bool:
    """fp32 CPU tensors with the index dtypes the C++ kernel reads, and an extension that built."""
    tensors = [x, w1, w2] + ([] if w3 is None else [w3])
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and row_index.dtype == torch.int64
        and offsets.dtype == torch.int32
        and offsets.device.type == "cpu"
        and cpu_extension.load() is not None
    )


def expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation: str = "swiglu", backend: str = "auto",
               source_order=None):
    """``out [M, d]``: the weighted expert outputs of the grouped rows, added at their source rows.

    Differentiable in ``x``, ``row_weight`` and the three weights on every backend. ``source_order``
    (optional, ``[N]``): the grouped rows of each source row, the same number r per row,
    ``row_index[source_order[m * r + j]] == m``; the Triton path then sums the results at their
    source rows without a sort of ``row_index`` (see :func:`kernels.triton_ops.expert_mlp_triton`, which
    checks it), the others ignore it and add the results with ``index_add``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_mlp: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if (w3 is None) == (activation == "swiglu"):
        raise ValueError("expert_mlp: w3 is required for swiglu and must be None otherwise")
    if row_index.shape != row_weight.shape or row_index.dim() != 1:
        raise ValueError(f"expert_mlp: row_index {tuple(row_index.shape)} and row_weight {tuple(row_weight.shape)} must be [N]")
    if backend == "auto":
        backend = _auto_backend(x, row_index, w1, w3)
    if backend == "gather":
        return expert_mlp_gathered(x, row_index, row_weight, offsets, w1, w3, w2, activation)
    if backend == "triton":
        if x.is_cuda or triton_on_cpu():
            from kernels.triton_ops import expert_mlp_triton

            return expert_mlp_triton(x, row_index, row_weight, offsets, w1, w3, w2, activation, source_order)
        backend = "torch"
    if backend == "torch" and x.device.type == "cpu":
        return _cpu_expert_mlp(x, row_index, row_weight, offsets, w1, w3, w2, activation)
    if backend in EXPERT_BACKENDS:
        return expert_mlp_reference(x, row_index, row_weight, offsets, w1, w3, w2, activation, backend=backend)
    raise ValueError(f"expert_mlp: unknown backend {backend!r}; expected one of {EXPERT_BACKENDS}")
