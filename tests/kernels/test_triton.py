"""Triton kernels (kernels.triton_ops) against the naive per-expert loop: outputs and every gradient.

On CPU the kernels run on Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when
there is no CUDA): fp32, tiny odd shapes (d and f not multiples of the 16-wide interpreter tiles),
up to 16 experts, empty experts, all rows on one expert, k = 1..4, a single token, all three
activations; weight gradients split into row chunks (chunk size forced small) under skewed routing,
bitwise deterministic. The `gpu` tests run the same cases on CUDA in fp32 (IEEE) and bf16, every autotune
candidate, and torch.compile with Inductor. One CPU test compiles the kernels for sm_90 (no GPU
needed) to check that they lower, pipeline and fit.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from kernels import expert_mlp_reference, grouped_mm_loop, offsets_from_counts  # noqa: E402
from kernels.triton_ops import (  # noqa: E402
    ExpertMLP,
    GroupedMM,
    expert_mlp_triton,
    grouped_mm_triton,
    triton_usable,
)

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
# (device, dtype) settings: the interpreter on CPU in fp32, and CUDA in fp32 (IEEE dots) and bf16.
SETTINGS = [
    pytest.param(("cpu", torch.float32), id="cpu-fp32",
                 marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for CPU tensors")),
    pytest.param(("cuda", torch.float32), id="cuda-fp32", marks=gpu),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=gpu),
]


def _assert_close(actual, expected, dtype, what=""):
    """Relative to the largest entry: fp32 1e-4; fp16 5e-3 and bf16 2e-2 (intermediates are rounded
    to the input dtype, the reference runs in fp32)."""
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}.get(dtype, 2e-2)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# grouped_mm
# ---------------------------------------------------------------------------------------------

GROUPED_CASES = [
    pytest.param([5, 0, 7, 3], 24, 40, 0, id="empty-expert"),
    pytest.param([0, 0, 19, 0], 24, 40, 0, id="all-on-one-expert"),
    pytest.param([1], 7, 5, 0, id="single-row"),
    pytest.param([3, 0, 0, 1, 17, 0, 2, 0, 0, 5, 0, 0, 0, 1, 0, 4], 33, 17, 0, id="16-experts"),
    pytest.param([0, 0, 0], 8, 8, 0, id="no-rows"),
    pytest.param([4, 3], 9, 6, 3, id="rows-past-last-offset"),
]


def _grouped_case(counts, K, M, extra_rows, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(counts) + extra_rows
    x = torch.randn(N, K, generator=g).to(device, dtype)
    w = (torch.randn(len(counts), K, M, generator=g) / K**0.5).to(device, dtype)
    grad = torch.randn(N, M, generator=g).to(device, dtype)
    return x, w, offsets_from_counts(torch.tensor(counts)).to(device), grad


def _grouped_run(fn, x, w, offsets, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w, offsets)
    out.backward(grad)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("counts, K, M, extra_rows", GROUPED_CASES)
def test_grouped_mm_matches_loop(setting, counts, K, M, extra_rows):
    device, dtype = setting
    x, w, offsets, grad = _grouped_case(counts, K, M, extra_rows, device, dtype)
    got = _grouped_run(grouped_mm_triton, x, w, offsets, grad)
    if x.shape[0] == 0:  # the loop's output has no graph then; ours does, with zero weight gradients
        assert got[0].shape == (0, M) and got[1].shape == (0, K) and torch.all(got[2] == 0)
        return
    want = _grouped_run(grouped_mm_loop, x.float(), w.float(), offsets, grad.float())
    for name, a, b in zip(("out", "grad x", "grad w"), got, want):
        assert a.dtype == dtype, name
        _assert_close(a, b, dtype, name)
    if extra_rows:  # rows in no group: zero output, zero gradient
        assert torch.all(got[0][-extra_rows:] == 0) and torch.all(got[1][-extra_rows:] == 0)
    empty = torch.tensor(counts) == 0
    assert torch.all(got[2][empty.to(device)] == 0)


def test_grouped_mm_autograd_function_matches_custom_op():
    if not triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    x, w, offsets, grad = _grouped_case([6, 0, 11], 24, 40, 0, "cpu", torch.float32)
    via_op = _grouped_run(grouped_mm_triton, x, w, offsets, grad)
    via_function = _grouped_run(GroupedMM.apply, x, w, offsets, grad)
    for a, b in zip(via_op, via_function):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# expert_mlp
# ---------------------------------------------------------------------------------------------


def _routing(T, E, k, skew, seed=0):
    """(row_index [N], row_weight [N], offsets [E]) of a top-k routing of T tokens, rows sorted by expert.

    skew: None (uniform), "one" (every token's first choice is expert 1), "few" (only experts
    0..k+1 are ever chosen, the rest stay empty), "heavy" (90% of the tokens choose expert 1 first,
    experts k+3.. stay empty: with k = 1, 90% of the rows on one expert).
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if skew == "one":
        scores[:, 1] += 10
    elif skew == "few":
        scores[:, k + 2:] -= 10
    elif skew == "heavy":
        scores[: T * 9 // 10, 1] += 10
        scores[:, k + 3:] -= 10
    top_scores, top_experts = scores.topk(k, dim=1)  # [T, k]
    weights = torch.softmax(top_scores, dim=1).flatten()
    flat_experts = top_experts.flatten()
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=E)
    return order // k, weights[order], offsets_from_counts(counts)


def _mlp_case(T, E, k, skew, d, f, activation, device, dtype, seed=0):
    row_index, row_weight, offsets = _routing(T, E, k, skew, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = dict(
        x=torch.randn(T, d, generator=g),
        row_weight=row_weight,
        w1=torch.randn(E, d, f, generator=g) / d**0.5,
        w3=torch.randn(E, d, f, generator=g) / d**0.5 if activation == "swiglu" else None,
        w2=torch.randn(E, f, d, generator=g) / f**0.5,
    )
    tensors = {name: (t.to(device, dtype) if t is not None else None) for name, t in tensors.items()}
    grad = torch.randn(T, d, generator=g).to(device, dtype)
    return row_index.to(device), offsets.to(device), tensors, grad


def _mlp_run(fn, row_index, offsets, tensors, grad, requires=("x", "row_weight", "w1", "w3", "w2")):
    leaves = {name: (t.clone().requires_grad_(name in requires) if t is not None else None) for name, t in tensors.items()}
    out = fn(leaves["x"], row_index, leaves["row_weight"], offsets, leaves["w1"], leaves["w3"], leaves["w2"])
    if out.requires_grad:
        out.backward(grad)
    return out.detach(), {name: (t.grad if t is not None else None) for name, t in leaves.items()}


def _reference(activation):
    def run(x, row_index, row_weight, offsets, w1, w3, w2):
        f32 = [t.float() if t is not None else None for t in (x, row_weight, w1, w3, w2)]
        x, row_weight, w1, w3, w2 = f32
        return expert_mlp_reference(x, row_index, row_weight, offsets, w1, w3, w2, activation, backend="loop")

    return run


def _fused(activation):
    return lambda *args: expert_mlp_triton(*args, activation=activation)


MLP_CASES = [
    pytest.param(7, 4, 2, None, 24, 40, id="T7-E4-k2"),
    pytest.param(9, 16, 4, "few", 24, 40, id="T9-E16-k4-empty-experts"),
    pytest.param(6, 8, 1, "one", 24, 40, id="T6-E8-k1-all-on-one-expert"),
    pytest.param(1, 4, 3, None, 24, 40, id="single-token-k3"),
    pytest.param(20, 3, 3, None, 7, 5, id="T20-E3-k3-multi-tile-tiny-dims"),
]


def _check_mlp(setting, T, E, k, skew, d, f, activation, requires=("x", "row_weight", "w1", "w3", "w2")):
    device, dtype = setting
    row_index, offsets, tensors, grad = _mlp_case(T, E, k, skew, d, f, activation, device, dtype)
    out, grads = _mlp_run(_fused(activation), row_index, offsets, tensors, grad, requires)
    ref, ref_grads = _mlp_run(_reference(activation), row_index, offsets, tensors, grad, requires)
    assert out.dtype == dtype
    _assert_close(out, ref, dtype, "out")
    for name, want in ref_grads.items():
        if want is None:
            assert grads[name] is None, f"grad of {name} should be None"
        else:
            assert grads[name].dtype == tensors[name].dtype, name
            _assert_close(grads[name], want, dtype, f"grad of {name}")
    return out, grads, offsets


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("T, E, k, skew, d, f", MLP_CASES)
def test_expert_mlp_matches_loop(setting, activation, T, E, k, skew, d, f):
    out, grads, offsets = _check_mlp(setting, T, E, k, skew, d, f, activation)
    empty = (torch.diff(offsets, prepend=offsets.new_zeros(1)) == 0)
    for name in ("w1", "w3", "w2"):
        if grads[name] is not None:
            assert torch.all(grads[name][empty] == 0), f"grad of {name} of an empty expert"


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("requires", [("x",), ("row_weight",), ("w1", "w2"), ("w3",), ()], ids=str)
def test_expert_mlp_computes_only_the_gradients_asked_for(setting, requires):
    _check_mlp(setting, 7, 4, 2, None, 24, 40, "swiglu", requires)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for CPU tensors")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_on_the_interpreter(activation):
    """fp16 inputs (the interpreter has no bf16): fp32 accumulation, fp16 outputs and gradients."""
    _check_mlp(("cpu", torch.float16), 7, 4, 2, None, 24, 40, activation)
    x, w, offsets, grad = _grouped_case([5, 0, 7, 3], 24, 40, 0, "cpu", torch.float16)
    got = _grouped_run(grouped_mm_triton, x, w, offsets, grad)
    want = _grouped_run(grouped_mm_loop, x.float(), w.float(), offsets, grad.float())
    for name, a, b in zip(("out", "grad x", "grad w"), got, want):
        assert a.dtype == torch.float16, name
        _assert_close(a, b, torch.float16, name)


def _source_order(row_index, T, k):
    """Each token's k grouped rows, in the reverse of their grouped order (the kernels must not rely
    on any order within a token)."""
    return torch.argsort(row_index, stable=True).view(T, k).flip(1).flatten()


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("T, E, k, skew, d, f", MLP_CASES)
def test_expert_mlp_with_the_dispatchers_source_order_matches_loop(setting, activation, T, E, k, skew, d, f):
    """Summing at the source rows through ``source_order`` (no sort of row_index) gives the loop's
    output and gradients."""
    device, dtype = setting
    row_index, offsets, tensors, grad = _mlp_case(T, E, k, skew, d, f, activation, device, dtype)
    source_order = _source_order(row_index, T, k)
    fused = lambda *a: expert_mlp_triton(*a, activation=activation, source_order=source_order)  # noqa: E731
    out, grads = _mlp_run(fused, row_index, offsets, tensors, grad)
    ref, ref_grads = _mlp_run(_reference(activation), row_index, offsets, tensors, grad)
    _assert_close(out, ref, dtype, "out")
    for name, want in ref_grads.items():
        if want is not None:
            _assert_close(grads[name], want, dtype, f"grad of {name}")


def test_source_order_is_checked():
    row_index, offsets, t, _ = _mlp_case(5, 4, 2, None, 8, 12, "swiglu", "cpu", torch.float32)
    args = (t["x"], row_index, t["row_weight"], offsets, t["w1"], t["w3"], t["w2"], "swiglu")
    with pytest.raises(ValueError, match="source_order must be int64"):
        expert_mlp_triton(*args, source_order=row_index[:-1])
    with pytest.raises(ValueError, match="same number of grouped rows per source row"):
        expert_mlp_triton(t["x"][:3], row_index, *args[2:], source_order=row_index)


@pytest.mark.parametrize("setting", SETTINGS)
def test_expert_mlp_source_rows_nobody_reads_get_zeros(setting):
    device, dtype = setting
    row_index, offsets, tensors, grad = _mlp_case(5, 4, 2, None, 8, 12, "relu", device, dtype)
    tensors["x"] = torch.cat([tensors["x"], torch.randn(3, 8).to(device, dtype)])  # rows 5..7: never routed
    grad = torch.cat([grad, torch.randn(3, 8).to(device, dtype)])
    out, grads = _mlp_run(_fused("relu"), row_index, offsets, tensors, grad)
    assert torch.all(out[5:] == 0) and torch.all(grads["x"][5:] == 0)


def test_expert_mlp_is_deterministic_and_the_function_matches_the_op():
    if not triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    row_index, offsets, tensors, grad = _mlp_case(7, 4, 3, None, 24, 40, "swiglu", "cpu", torch.float32)
    first = _mlp_run(_fused("swiglu"), row_index, offsets, tensors, grad)
    second = _mlp_run(_fused("swiglu"), row_index, offsets, tensors, grad)
    function = _mlp_run(lambda *a: ExpertMLP.apply(*a, "swiglu"), row_index, offsets, tensors, grad)
    for other in (second, function):
        assert torch.equal(first[0], other[0])
        for name, value in first[1].items():
            assert (value is None and other[1][name] is None) or torch.equal(value, other[1][name]), name


def test_inference_saves_no_activations():
    if not triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    row_index, offsets, t, _ = _mlp_case(5, 4, 2, None, 8, 12, "swiglu", "cpu", torch.float32)
    args = (t["x"], row_index, t["row_weight"], offsets, t["w1"], t["w3"], t["w2"])
    out, h1, h3 = torch.ops.slimmoe.expert_mlp(*args, "swiglu", False)
    assert h1.numel() == 0 and h3.numel() == 0
    with torch.no_grad():
        torch.testing.assert_close(expert_mlp_triton(*args), out, rtol=0, atol=0)
    _, h1, h3 = torch.ops.slimmoe.expert_mlp(*args, "swiglu", True)
    assert h1.shape == h3.shape == (row_index.shape[0], 12)


def test_bad_arguments_raise_value_errors():
    row_index, offsets, t, _ = _mlp_case(5, 4, 2, None, 8, 12, "swiglu", "cpu", torch.float32)
    with pytest.raises(ValueError, match="offsets must be int32"):
        grouped_mm_triton(t["x"], t["w1"], offsets.long())
    with pytest.raises(ValueError, match="w3 is required"):
        expert_mlp_triton(t["x"], row_index, t["row_weight"], offsets, t["w1"], None, t["w2"], "swiglu")
    with pytest.raises(ValueError, match="unknown activation"):
        expert_mlp_triton(t["x"], row_index, t["row_weight"], offsets, t["w1"], None, t["w2"], "tanh")


def test_triton_usable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_usable(torch.empty(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_usable(torch.empty(1))
    assert not triton_usable(torch.empty(1, device="meta"))


# ---------------------------------------------------------------------------------------------
# Weight gradients in row chunks (skewed routing)
# ---------------------------------------------------------------------------------------------


def _tk():
    import kernels.triton_kernels as tk  # imports triton: after conftest has set TRITON_INTERPRET

    return tk


@pytest.fixture
def small_chunks(monkeypatch):
    """Weight-gradient row chunks of 16 rows (the interpreter's BLOCK_M), so that a few dozen rows
    make several chunks per expert. Yields the list of chunk reductions launched."""
    tk = _tk()
    monkeypatch.setattr(tk, "XTY_CHUNK_ROWS", 16)
    reductions = []
    real = tk._reduce_chunks

    def spy(*args):
        reductions.append(args)
        real(*args)

    monkeypatch.setattr(tk, "_reduce_chunks", spy)
    return reductions


_chunk_schedule = None  # kernels.triton_kernels._chunk_schedule, once _schedule_probe ran


@functools.lru_cache(maxsize=None)
def _schedule_probe():
    """A kernel that writes what kernels.triton_kernels._chunk_schedule gives each program."""
    import triton
    import triton.language as tl

    global _chunk_schedule
    _chunk_schedule = _tk()._chunk_schedule  # a global: the interpreter does not see closures

    @triton.jit
    def probe(offsets_ptr, out_ptr, num_experts, chunk_rows, E_PAD: tl.constexpr, ALIGN: tl.constexpr):
        c = tl.program_id(0)
        expert, lo, hi, n, slot, total = _chunk_schedule(c, offsets_ptr, num_experts, chunk_rows, E_PAD, ALIGN)
        row = out_ptr + c * 6
        tl.store(row, expert)
        tl.store(row + 1, lo)
        tl.store(row + 2, hi)
        tl.store(row + 3, n)
        tl.store(row + 4, slot)
        tl.store(row + 5, total)

    return probe


SCHEDULE_CASES = [
    pytest.param([0, 90, 0, 5, 33, 0], 16, 16, id="skewed-16"),
    pytest.param([0, 90, 0, 5, 33, 0], 24, 16, id="skewed-24-unaligned"),
    pytest.param([0, 0, 200, 0], 32, 16, id="all-on-one-expert"),
    pytest.param([31, 32, 47, 48, 64, 0, 1], 16, 16, id="chunk-count-edges"),
    pytest.param([0, 0, 0], 16, 16, id="no-rows"),
    pytest.param([5, 3, 9], 64, 16, id="nothing-split"),
    pytest.param([1000, 3], 100, 64, id="align-64"),
]


@pytest.mark.parametrize("counts, chunk_rows, align", SCHEDULE_CASES)
def test_chunk_schedule_partitions_each_expert(counts, chunk_rows, align):
    """The device-side chunk schedule: max(1, count // chunk_rows) non-empty chunks per expert, in
    order, covering its rows exactly; partial slots numbered 0.. in expert then chunk order for the
    experts of several chunks; totals within the host's upper bounds (the grid and buffer sizes)."""
    if INTERPRET:
        device = "cpu"
    elif CUDA:
        device = "cuda"
    else:
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    tk = _tk()
    offsets = offsets_from_counts(torch.tensor(counts)).to(device)
    max_chunks, max_slots = tk.xty_chunk_bounds(sum(counts), len(counts), chunk_rows)
    grid = max_chunks + 3  # programs past the last chunk must see it
    out = torch.full((grid, 6), -1, dtype=torch.int32, device=device)
    _schedule_probe()[(grid,)](offsets, out, len(counts), chunk_rows, E_PAD=tk._e_pad(len(counts)), ALIGN=align)
    out = out.cpu().tolist()
    chunks = [max(1, c // chunk_rows) for c in counts]
    assert all(row[5] == sum(chunks) for row in out)
    assert sum(chunks) <= max_chunks
    c, slot, start = 0, 0, 0
    for e, count in enumerate(counts):
        row_at = start
        for j in range(chunks[e]):
            expert, lo, hi, n, got_slot, _ = out[c]
            assert (expert, n, lo) == (e, chunks[e], row_at), (e, j, out[c])
            assert lo < hi or count == 0, f"expert {e} chunk {j} is empty: {out[c]}"
            assert (lo - start) % align == 0
            if chunks[e] >= 2:
                assert got_slot == slot
                slot += 1
            row_at = hi
            c += 1
        assert row_at == start + count
        start += count
    assert slot <= max_slots


def test_chunk_rows_rule_and_memory_bound():
    tk = _tk()
    for rows, experts in [(1, 1), (100, 8), (8192, 8), (32768, 8), (98304, 64), (12345, 7), (5000, 256)]:
        for K, N, sms in [(64, 64, None), (512, 1024, 132), (2048, 1408, 132)]:
            chunk = tk.xty_chunk_rows(rows, experts, K, N, sms)
            assert chunk % tk.XTY_CHUNK_ALIGN == 0 and chunk >= max(tk.XTY_MIN_CHUNK_ROWS, rows / experts)
            max_chunks, max_slots = tk.xty_chunk_bounds(rows, experts, chunk)
            assert max_slots <= experts  # partial buffer <= the weight gradient's element count
            assert max_chunks <= 2 * experts
    # One expert's [K, N] tiles already fill 132 SMs many times over (Mixtral-sized): nothing is split.
    chunk = tk.xty_chunk_rows(32768, 8, 4096, 14336, 132)
    assert tk.xty_chunk_bounds(32768, 8, chunk) == (8, 0)
    # Small expert matrices: the heaviest expert is split (chunks of N / E rows).
    assert tk.xty_chunk_rows(32768, 8, 512, 1024, 132) == 4096
    # The bounds hold for any routing (exhaustive over small count vectors).
    import itertools

    for counts in itertools.product([0, 3, 4, 7, 8, 9, 12], repeat=3):
        rows = sum(counts)
        for chunk_rows in (1, 2, 3, 4):
            max_chunks, max_slots = tk.xty_chunk_bounds(rows, 3, chunk_rows)
            per_expert = [max(1, c // chunk_rows) for c in counts]
            assert sum(per_expert) <= max_chunks
            assert sum(n for n in per_expert if n >= 2) <= max_slots


SKEWED_GROUPED_CASES = [
    pytest.param([0, 96, 0, 3, 33, 0], 12, 20, 4, id="73pct-on-one-expert-empty-experts"),
    pytest.param([0, 0, 64, 0], 9, 6, 0, id="all-on-one-expert"),
]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("counts, K, M, extra_rows", SKEWED_GROUPED_CASES)
def test_grouped_mm_weight_gradient_in_row_chunks(setting, counts, K, M, extra_rows, small_chunks):
    device, dtype = setting
    x, w, offsets, grad = _grouped_case(counts, K, M, extra_rows, device, dtype)
    got = _grouped_run(grouped_mm_triton, x, w, offsets, grad)
    assert small_chunks, "no expert was split into row chunks"
    want = _grouped_run(grouped_mm_loop, x.float(), w.float(), offsets, grad.float())
    for name, a, b in zip(("out", "grad x", "grad w"), got, want):
        assert a.dtype == dtype, name
        _assert_close(a, b, dtype, name)
    empty = torch.tensor(counts) == 0
    assert torch.all(got[2][empty.to(device)] == 0)
    again = _grouped_run(grouped_mm_triton, x, w, offsets, grad)
    for name, a, b in zip(("out", "grad x", "grad w"), got, again):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("T, E, k, activation", [
    pytest.param(64, 6, 1, "swiglu", id="90pct-on-one-expert-k1-swiglu"),
    pytest.param(40, 8, 2, "gelu", id="k2-gelu"),
])
def test_expert_mlp_weight_gradients_in_row_chunks(setting, T, E, k, activation, small_chunks):
    """Skewed routing with some experts empty: every output and gradient against the loop, bitwise
    the same on a second run. SwiGLU takes the two-output path (w1 and w3 in one pass, x gathered),
    GELU the one-output gathered-x path; both the gathered-y path (w2)."""
    out, grads, offsets = _check_mlp(setting, T, E, k, "heavy", 12, 20, activation)
    assert small_chunks, "no expert was split into row chunks"
    empty = (torch.diff(offsets, prepend=offsets.new_zeros(1)) == 0)
    assert empty.any()
    for name in ("w1", "w3", "w2"):
        if grads[name] is not None:
            assert torch.all(grads[name][empty] == 0), f"grad of {name} of an empty expert"
    device, dtype = setting
    row_index, offsets, tensors, grad = _mlp_case(T, E, k, "heavy", 12, 20, activation, device, dtype)
    again_out, again = _mlp_run(_fused(activation), row_index, offsets, tensors, grad)
    assert torch.equal(out, again_out)
    for name, value in grads.items():
        assert (value is None and again[name] is None) or torch.equal(value, again[name]), name


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ---------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    if not triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    x, w, offsets, _ = _grouped_case([3, 0, 2], 5, 6, 0, "cpu", torch.float32)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.slimmoe.grouped_mm, (x, w.requires_grad_(), offsets), test_utils=tests)
    row_index, offsets, t, grad = _mlp_case(4, 3, 2, None, 5, 6, "swiglu", "cpu", torch.float32)
    args = (t["x"].requires_grad_(), row_index, t["row_weight"], offsets, t["w1"], t["w3"], t["w2"], "swiglu", True)
    torch.library.opcheck(torch.ops.slimmoe.expert_mlp, args, test_utils=tests)
    torch.library.opcheck(torch.ops.slimmoe.expert_mlp, (*args, _source_order(row_index, 4, 2)), test_utils=tests)


def _layer(x, row_index, row_weight, offsets, w1, w3, w2, w_out, out_offsets):
    """A small function in the shape of an MoE layer: the fused expert MLP, then a grouped GEMM."""
    y = expert_mlp_triton(x, row_index, row_weight, offsets, w1, w3, w2, "swiglu")
    z = grouped_mm_triton(torch.tanh(y), w_out, out_offsets)
    return (z * z).sum()


def _compile_check(device, dtype, backend):
    row_index, offsets, t, _ = _mlp_case(7, 4, 2, None, 24, 40, "swiglu", device, dtype)
    w_out = torch.randn(2, 24, 8).to(device, dtype)
    out_offsets = torch.tensor([3, 7], dtype=torch.int32, device=device)
    leaves = [t["x"], t["row_weight"], t["w1"], t["w3"], t["w2"], w_out]

    def run(fn):
        x, rw, w1, w3, w2, wo = args = [v.clone().requires_grad_() for v in leaves]
        loss = fn(x, row_index, rw, offsets, w1, w3, w2, wo, out_offsets)
        loss.backward()
        return [loss.detach()] + [a.grad for a in args]

    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True, backend=backend)
    for got, want in zip(run(compiled), run(_layer)):
        _assert_close(got, want, dtype)


def test_torch_compile_fullgraph_on_the_interpreter():
    """Dynamo + AOTAutograd trace forward and backward through the slimmoe:: ops without a graph break."""
    if not triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    _compile_check("cpu", torch.float32, "aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_compile_fullgraph_inductor(dtype):
    _compile_check("cuda", dtype, "inductor")


# ---------------------------------------------------------------------------------------------
# GPU only: every autotune candidate, larger shapes
# ---------------------------------------------------------------------------------------------


def _every_config():
    if not CUDA:
        return [pytest.param(None, None, id="no-gpu", marks=gpu)]
    import kernels.triton_kernels as tk

    return [pytest.param(name, config, id=f"{name}-{i}", marks=gpu)
            for name, configs in tk._CONFIGS.items() for i, config in enumerate(configs)]


@pytest.mark.slow
@pytest.mark.parametrize("config_set, config", _every_config())
def test_every_autotune_candidate_is_correct(config_set, config, monkeypatch):
    import kernels.triton_kernels as tk

    with tk.force_config(config_set, config):
        for activation in ("swiglu", "gelu"):
            _check_mlp(("cuda", torch.bfloat16), 300, 8, 2, "few", 200, 136, activation)
            if config_set in ("xty", "xty_dual"):  # weight gradients in row chunks, 90% of the rows on one expert
                with monkeypatch.context() as patch:
                    patch.setattr(tk, "XTY_CHUNK_ROWS", 64)
                    _check_mlp(("cuda", torch.bfloat16), 300, 8, 1, "heavy", 200, 136, activation)
        x, w, offsets, grad = _grouped_case([130, 0, 70, 1, 99], 200, 136, 0, "cuda", torch.bfloat16)
        got = _grouped_run(grouped_mm_triton, x, w, offsets, grad)
        want = _grouped_run(grouped_mm_loop, x.float(), w.float(), offsets, grad.float())
        for a, b in zip(got, want):
            _assert_close(a, b, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_bf16_layer_sized_shapes(activation):
    """Layer-sized shapes on the default configs (every other candidate is checked above)."""
    _check_mlp(("cuda", torch.bfloat16), 512, 16, 4, None, 256, 384, activation)
    _check_mlp(("cuda", torch.bfloat16), 256, 8, 2, "one", 128, 200, activation)


def test_launch_reuses_the_autotuners_choice_per_key(monkeypatch):
    """With autotuning on, the first launch of a (kernel, tune key, operand dtypes) goes through
    triton.autotune; later launches of that key call the kernel with the config it chose, and a new
    key (another K, or another dtype) asks the autotuner again. Stand-in kernel and autotuner: this
    checks the launcher's bookkeeping, on any machine."""
    tk = _tk()
    launched, tuned = [], []

    class Kernel:  # a compiled JIT function's indexing: kernel[grid](**kwargs)
        def __getitem__(self, grid):
            return lambda **kwargs: launched.append(kwargs)

    class Tuner:
        best_config = tk._cfg(128, 64, 32, 8, 3)

        def __getitem__(self, grid):
            return lambda **kwargs: tuned.append(kwargs)

    monkeypatch.setattr(tk, "interpreting", lambda: False)
    monkeypatch.setitem(tk._KERNELS, "xty", Kernel())
    monkeypatch.setattr(tk, "_tuned", lambda name, config_set: Tuner())
    monkeypatch.setattr(tk, "_CHOSEN", {})
    monkeypatch.setenv("SLIMMOE_TRITON_AUTOTUNE", "1")

    def launch(K, dtype):
        tensors = {name: torch.empty(1, dtype=dtype) for name in ("x_ptr", "y_ptr", "out_ptr")}
        tk._launch("xty", "xty", None, **tensors, K=K, N=64, tune_rows=256, DUAL=False)

    launch(512, torch.float32)
    launch(512, torch.float32)
    launch(512, torch.float32)
    assert len(tuned) == 1 and len(launched) == 2
    config = Tuner.best_config
    assert all(call["BLOCK_M"] == 128 and call["BLOCK_N"] == 64 and call["BLOCK_K"] == 32 and call["num_warps"] == 8
               and call["num_stages"] == 3 and call["K"] == 512 for call in launched), (launched, config)
    launch(1024, torch.float32)  # another tune key
    launch(512, torch.bfloat16)  # another operand dtype
    assert len(tuned) == 3 and len(launched) == 2
    launch(1024, torch.float32)
    assert len(tuned) == 3 and len(launched) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_autotuned_layer_sized_shape(monkeypatch):
    """The autotuner's own path, once: it benchmarks every candidate of every kernel of a SwiGLU
    forward and backward (each candidate compiles: this one test takes tens of seconds) and the
    result it picks is correct."""
    monkeypatch.setenv("SLIMMOE_TRITON_AUTOTUNE", "1")
    _check_mlp(("cuda", torch.bfloat16), 512, 16, 4, None, 256, 384, "swiglu")


# ---------------------------------------------------------------------------------------------
# Compiles for sm_90 without a GPU
# ---------------------------------------------------------------------------------------------


def _aot_report() -> dict:
    """Compile each kernel variant with its default config for sm_90 from layer-sized example
    arguments, specialised the way the JIT specialises them, and report what the compiler made.

    Run in a fresh process without TRITON_INTERPRET (kernels must be JIT functions, not interpreted).
    """
    import re
    import tempfile

    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    import kernels.triton_kernels as tk

    type_names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def compile_one(fn, args, config):
        args = {**args, **config.kwargs}
        signature, constants, attrs = {}, {}, {}
        no_spec = set(fn.do_not_specialize or ())
        for i, param in enumerate(fn.params):
            value = args[param.name]
            if param.is_constexpr:
                signature[param.name], constants[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + type_names[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif i in no_spec or param.name in no_spec:
                signature[param.name] = "i32"
            else:
                kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
                if kind == "constexpr":
                    signature[param.name], constants[param.name] = "constexpr", value
                else:
                    signature[param.name] = kind
                    if spec == "D":
                        attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
        ttgir = compiled.asm["ttgir"]
        return dict(regs=int(regs), spill_bytes=int(stack), shared=compiled.metadata.shared,
                    pipelined="async_copy_global_to_local" in ttgir, wgmma="warp_group_dot" in ttgir)

    def captured(launcher, *args, **kwargs):
        seen = []
        real_launch, real_reduce = tk._launch, tk._reduce_chunks
        tk._launch = lambda name, config_set, grid, **a: seen.append((name, config_set, a))
        tk._reduce_chunks = lambda *a: None  # nothing to reduce: the GEMM did not run
        try:
            launcher(*args, **kwargs)
        finally:
            tk._launch, tk._reduce_chunks = real_launch, real_reduce
        return seen[0]

    E, d, f, N, T = 8, 2048, 768, 8192, 4096
    bf = torch.bfloat16
    x, g = torch.randn(T, d, dtype=bf), torch.randn(T, d, dtype=bf)
    row_index, row_weight = torch.randint(0, T, (N,)), torch.rand(N)
    offsets = torch.cumsum(torch.full((E,), N // E), 0).to(torch.int32)
    w1, w3, w2 = torch.randn(E, d, f, dtype=bf), torch.randn(E, d, f, dtype=bf), torch.randn(E, f, d, dtype=bf)
    h = torch.randn(N, f, dtype=bf)
    variants = {
        "gemm_act swiglu": captured(tk.gemm_act, x, row_index, offsets, w1, w3, "swiglu", True),
        "gemm_act gelu": captured(tk.gemm_act, x, row_index, offsets, w1, None, "gelu", True),
        "grouped_gemm scaled": captured(tk.grouped_gemm, h, w2, offsets, row_scale=row_weight),
        "grouped_gemm transposed two operands": captured(tk.grouped_gemm, h, w1.transpose(1, 2), offsets, a2=h,
                                                         b2=w3.transpose(1, 2)),
        "act_backward swiglu": captured(tk.act_backward_gemm, g, row_index, row_weight, offsets, w2, h, h, "swiglu",
                                        need_dh=True, need_act_w=True, need_drw=True),
        "xty gathered two outputs": captured(tk.grouped_xty, x, h, offsets, x_index=row_index, y2=h),
        "xty gathered y": captured(tk.grouped_xty, h, g, offsets, y_index=row_index),
    }
    report = {label: compile_one(tk._KERNELS[name], args, tk.DEFAULT_CONFIG[config_set])
              for label, (name, config_set, args) in variants.items()}
    order, segments = tk.source_segments(row_index, T)
    y = torch.empty(N, d, dtype=bf)
    for label, seg_stride in (("segment_sum", 0), ("segment_sum fixed rows per source", 2)):
        segment_args = dict(src_ptr=y, order_ptr=order, seg_ptr=segments, out_ptr=x, D=d, stride_sm=d, stride_om=d,
                            seg_stride=seg_stride)
        report[label] = compile_one(tk._segment_sum_kernel, segment_args,
                                    triton.Config(dict(BLOCK_D=1024), num_warps=4, num_stages=1))
    partial = torch.empty(4, d, f, dtype=torch.float32)
    out = torch.empty(E, d, f, dtype=bf)
    reduce_args = dict(partial_ptr=partial, partial2_ptr=partial, out_ptr=out, out2_ptr=out, offsets_ptr=offsets,
                       num_experts=E, chunk_rows=1024, size=d * f, stride_oe=d * f, DUAL=True,
                       E_PAD=tk._e_pad(E))
    report["xty_chunk_reduce"] = compile_one(tk._xty_chunk_reduce_kernel, reduce_args,
                                             triton.Config(dict(BLOCK=1024), num_warps=4, num_stages=1))
    import kernels.triton_grouping as tg

    for experts in (64, tg.MAX_EXPERTS):  # the grouping kernels' register use grows with E_PAD
        ids, blocks = torch.randint(0, experts, (N,)), triton.cdiv(N, tg.BLOCK_SLOTS)
        ends = torch.empty(experts * blocks, dtype=torch.int32)
        block = dict(BLOCK=tg.BLOCK_SLOTS, E_PAD=tg._e_pad(experts))
        report[f"grouping histogram E={experts}"] = compile_one(
            tg._block_histogram_kernel, dict(ids_ptr=ids, hist_ptr=ends, num_slots=N, num_blocks=blocks,
                                             num_experts=experts),
            triton.Config(dict(block, CHUNK=tg.EXPERT_CHUNK), num_warps=4, num_stages=1))
        report[f"grouping scatter E={experts}"] = compile_one(
            tg._block_scatter_kernel, dict(ids_ptr=ids, weight_ptr=row_weight.to(bf), ends_ptr=ends,
                                           row_index_ptr=row_index, row_weight_ptr=row_weight.to(bf),
                                           source_order_ptr=row_index, offsets_ptr=offsets, num_slots=N,
                                           num_blocks=blocks, num_experts=experts, top_k=2),
            triton.Config(block, num_warps=4, num_stages=1))
    import kernels.triton_router as tr
    from kernels.triton_ops import ROUTING_MAX_EXPERTS

    for experts, top_k in ((64, 6), (64, 64), (ROUTING_MAX_EXPERTS, 16)):  # fine-grained, k = E, the most experts
        block_t, e_pad, k_pad = tr._tiles(experts, top_k)
        logits, tokens = torch.empty(T, experts), T
        shape = dict(BLOCK_T=block_t, E_PAD=e_pad, K_PAD=k_pad)
        indices, weights = torch.empty(T, top_k, dtype=torch.int64), torch.empty(T, top_k)
        for score in (0, 1):
            for normalize in (True, False):
                variant = f"E={experts} k={top_k} {'softmax' if score == 0 else 'sigmoid'}{' normalised' if normalize else ''}"
                report[f"router {variant} with bias"] = compile_one(
                    tr._topk_route_kernel, dict(logits_ptr=logits, bias_ptr=logits[0], indices_ptr=indices,
                                                weights_ptr=weights, counts_ptr=indices[0], num_tokens=tokens,
                                                num_experts=experts, top_k=top_k, stride_t=experts),
                    triton.Config(dict(shape, SCORE=score, NORMALIZE=normalize, HAS_BIAS=True), num_warps=4,
                                  num_stages=1))
                report[f"router backward {variant}"] = compile_one(
                    tr._topk_route_backward_kernel, dict(grad_ptr=weights, logits_ptr=logits, indices_ptr=indices,
                                                         weights_ptr=weights, grad_logits_ptr=logits,
                                                         num_tokens=tokens, num_experts=experts, top_k=top_k,
                                                         stride_t=experts, stride_gt=experts),
                    triton.Config(dict(shape, SCORE=score, NORMALIZE=normalize), num_warps=4, num_stages=1))
    return report


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts things the GPU compiler rejects (and ignores pipelining): compile the
    default configs for an H100 with the installed triton and check they pipeline and fit."""
    if CUDA:
        pytest.skip("a GPU is here: the gpu tests run the kernels for real")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "import json, tests.kernels.test_triton as t; print('AOT' + json.dumps(t._aot_report()))"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("AOT")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    reports = json.loads(lines[-1][3:])
    assert reports.pop("segment_sum")["spill_bytes"] == 0
    assert reports.pop("segment_sum fixed rows per source")["spill_bytes"] == 0
    assert reports.pop("xty_chunk_reduce")["spill_bytes"] == 0
    for label in [label for label in reports if label.startswith(("grouping", "router"))]:
        assert reports.pop(label)["spill_bytes"] == 0, label
    for label, report in reports.items():
        assert report["pipelined"], f"{label}: main loop not software-pipelined: {report}"
        assert report["wgmma"], f"{label}: no wgmma: {report}"
        assert report["shared"] <= 227 * 1024, f"{label}: too much shared memory: {report}"
        assert report["spill_bytes"] <= 64, f"{label}: register spills: {report}"
