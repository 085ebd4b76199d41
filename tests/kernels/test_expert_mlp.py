"""kernels.expert_mlp (gather + expert MLP + weighted scatter, fused) against the unfused reference
and against a per-row loop: outputs and the gradients of x, the row weights and every weight.

The CPU "torch" backend has two implementations, and the tests below run each of them: the C++
extension (``kernels/csrc/expert_mlp_cpu.cpp``) with its threads sharing whole experts, with them
running one expert after another, and with its own choice; and the Python fallback.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import cpu_extension, expert_mlp_reference

EXPERT_MLP = importlib.import_module("kernels.expert_mlp")
CPU_PATHS = {  # path -> (UNIT_PARALLEL, the autograd node the output must come from)
    "extension": (-1, "_ExtensionExpertMLPBackward"),
    "extension-units": (1, "_ExtensionExpertMLPBackward"),
    "extension-serial": (0, "_ExtensionExpertMLPBackward"),
    "python": (None, "_BlockedExpertMLPBackward"),
}


@pytest.fixture(params=list(CPU_PATHS))
def cpu_path(request, monkeypatch):
    """One CPU implementation, with two threads so the extension's threads can share the experts."""
    mode, node = CPU_PATHS[request.param]
    if mode is None:
        monkeypatch.setenv("SLIMMOE_CPU_EXTENSION", "0")
    else:
        assert cpu_extension.load() is not None, f"the C++ CPU kernel did not build: {cpu_extension.build_error()}"
        monkeypatch.setattr(EXPERT_MLP, "UNIT_PARALLEL", mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield node
    torch.set_num_threads(threads)


def _ran_on(out: torch.Tensor, node: str) -> None:
    assert type(out.grad_fn).__name__ == node, f"ran {type(out.grad_fn).__name__}, expected {node}"


def _per_row(x, row_index, row_weight, counts, w1, w3, w2, activation):
    out = torch.zeros_like(x)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).tolist()
    for i, e in enumerate(expert_of_row):
        v = x[row_index[i]]
        h = v @ w1[e]
        h = F.silu(h) * (v @ w3[e]) if activation == "swiglu" else F.gelu(h) if activation == "gelu" else F.relu(h)
        out = out.index_add(0, row_index[i : i + 1], (row_weight[i] * (h @ w2[e])).unsqueeze(0))
    return out


def _case(counts, d, f, activation, num_source, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_rows = sum(counts)
    # every source row appears at most once per expert, like a router's top-k
    row_index = torch.cat([torch.randperm(num_source, generator=g)[:c] for c in counts]) if num_rows else torch.zeros(0, dtype=torch.int64)
    E = len(counts)
    tensors = dict(
        x=torch.randn(num_source, d, generator=g),
        row_weight=torch.rand(num_rows, generator=g),
        w1=torch.randn(E, d, f, generator=g) / d**0.5,
        w3=torch.randn(E, d, f, generator=g) / d**0.5 if activation == "swiglu" else None,
        w2=torch.randn(E, f, d, generator=g) / f**0.5,
    )
    return row_index, kernels.offsets_from_counts(torch.tensor(counts)), tensors


def _run(fn, row_index, offsets, tensors, grad):
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in tensors.items()}
    out = fn(leaves["x"], row_index, leaves["row_weight"], offsets, leaves["w1"], leaves["w3"], leaves["w2"])
    out.backward(grad)
    return out, {k: (v.grad if v is not None else None) for k, v in leaves.items()}


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize(
    "counts, d, f, num_source",
    [
        ([5, 0, 7, 3], 8, 12, 9),  # an empty expert
        ([0, 11, 0], 7, 5, 11),  # everything on one expert, odd sizes
        ([1], 3, 2, 1),  # a single row
        ([2, 3], 6, 4, 10),  # source rows that no expert reads get zero output and zero gradient
        ([700, 0, 900, 500, 1], 5, 3, 2000),  # several blocks of the blocked path
        ([40] * 12 + [3, 0, 90], 20, 36, 120),  # many experts: the extension's threads share them
    ],
)
def test_fused_expert_mlp_matches_reference_and_per_row_loop(cpu_path, activation, counts, d, f, num_source):
    row_index, offsets, tensors = _case(counts, d, f, activation, num_source)
    grad = torch.randn(num_source, d)
    act = dict(activation=activation)
    fused, fused_grads = _run(lambda *a: kernels.expert_mlp(*a, **act, backend="torch"), row_index, offsets, tensors, grad)
    _ran_on(fused, cpu_path)
    ref, ref_grads = _run(lambda *a: expert_mlp_reference(*a, **act, backend="loop"), row_index, offsets, tensors, grad)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for name, value in ref_grads.items():
        if value is not None:
            torch.testing.assert_close(fused_grads[name], value, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")
    if sum(counts) <= 20:
        loop = _per_row(tensors["x"], row_index, tensors["row_weight"], counts, tensors["w1"], tensors["w3"], tensors["w2"], activation)
        torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(num_source, dtype=torch.bool)
    untouched[row_index] = False
    assert torch.all(fused[untouched] == 0) and torch.all(fused_grads["x"][untouched] == 0)
    empty = torch.tensor(counts) == 0
    assert torch.all(fused_grads["w1"][empty] == 0) and torch.all(fused_grads["w2"][empty] == 0)


def test_fused_expert_mlp_skips_gradients_nobody_needs():
    row_index, offsets, t = _case([3, 4], 4, 4, "swiglu", 6)
    w1 = t["w1"].clone().requires_grad_()
    out = kernels.expert_mlp(t["x"], row_index, t["row_weight"], offsets, w1, t["w3"], t["w2"])
    out.sum().backward()
    assert w1.grad is not None and t["x"].grad is None and t["w2"].grad is None


def test_expert_mlp_rejects_bad_arguments():
    row_index, offsets, t = _case([2, 2], 4, 4, "swiglu", 4)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        kernels.expert_mlp(t["x"], row_index, t["row_weight"], offsets, t["w1"], t["w3"], t["w2"], activation="tanh")
    with pytest.raises(ValueError, match="w3 is required for swiglu"):
        kernels.expert_mlp(t["x"], row_index, t["row_weight"], offsets, t["w1"], None, t["w2"])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        kernels.expert_mlp(t["x"], row_index, t["row_weight"], offsets, t["w1"], t["w3"], t["w2"], backend="cuda")
    with pytest.raises(ValueError, match="must be \\[N\\]"):
        kernels.expert_mlp(t["x"], row_index, t["row_weight"][:3], offsets, t["w1"], t["w3"], t["w2"])


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("needs", [("x", "row_weight", "w1", "w3", "w2"), ("x",), ("w1", "w3"), ("row_weight", "w2")])
def test_blocked_path_over_many_blocks_and_any_subset_of_gradients(monkeypatch, cpu_path, activation, needs):
    """The CPU path over several blocks of different sizes (Python: experts grouped until a block is
    full, an empty expert inside one; C++: experts split into chunks of 256 rows whose weight
    gradients accumulate) with only some leaves requiring gradients: every gradient asked for
    matches the reference, and none is computed for a leaf that did not ask."""
    monkeypatch.setattr(EXPERT_MLP, "BLOCK_BYTES", 1)  # Python: blocks of >= 256 rows
    monkeypatch.setattr(EXPERT_MLP, "CHUNK_BYTES", 1)  # C++: chunks of at most 256 rows
    counts = [300, 0, 100, 200, 50, 400, 7]  # blocks of 300, 300 and 457 rows
    row_index, offsets, tensors = _case(counts, 6, 5, activation, 500, seed=1)
    grad = torch.randn(500, 6)

    def run(fn):
        leaves = {k: (v.clone().requires_grad_(k in needs) if v is not None else None) for k, v in tensors.items()}
        out = fn(leaves["x"], row_index, leaves["row_weight"], offsets, leaves["w1"], leaves["w3"], leaves["w2"],
                 activation=activation)
        out.backward(grad)
        return out, {k: v.grad for k, v in leaves.items() if v is not None}

    fused, fused_grads = run(lambda *a, **kw: kernels.expert_mlp(*a, **kw, backend="torch"))
    _ran_on(fused, cpu_path)
    ref, ref_grads = run(lambda *a, **kw: expert_mlp_reference(*a, **kw, backend="loop"))
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for name, value in ref_grads.items():
        if name in needs and value is not None:
            torch.testing.assert_close(fused_grads[name], value, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")
        else:
            assert fused_grads[name] is None, f"{name} got a gradient it did not ask for"


def test_cpu_weight_gradients_reuse_their_storage_only_once_nothing_holds_it(cpu_path):
    """The CPU kernel writes a weight's gradient into the storage of the one it returned last time
    when that gradient was dropped, and allocates when anything (the .grad, a view of it) still holds
    it. Stale values must never show: an expert without rows in a later step gets zeros, and a
    gradient still in use keeps its values while the next backward runs."""
    module = EXPERT_MLP
    d, f, num_source = 6, 5, 40
    _, _, tensors = _case([1, 1, 1], d, f, "swiglu", num_source, seed=2)
    weights = {k: tensors[k].clone().requires_grad_() for k in ("w1", "w3", "w2")}
    steps = [[10, 12, 9], [0, 15, 7], [8, 0, 13]]  # expert 0, then expert 1, get no rows after step 1

    def step(seed, counts):
        row_index, offsets, case = _case(counts, d, f, "swiglu", num_source, seed=seed)
        grad = torch.randn(num_source, d, generator=torch.Generator().manual_seed(seed))
        out = kernels.expert_mlp(case["x"], row_index, case["row_weight"], offsets, weights["w1"], weights["w3"],
                                 weights["w2"], activation="swiglu", backend="torch")
        out.backward(grad)
        _, expected = _run(lambda *a: expert_mlp_reference(*a, activation="swiglu", backend="loop"), row_index, offsets,
                           {**case, **{k: w.detach() for k, w in weights.items()}}, grad)
        return {k: expected[k] for k in weights}

    kernels.release_gradient_buffers()
    expected = step(10, steps[0])
    first = {k: w.grad for k, w in weights.items()}
    first_values = {k: g.clone() for k, g in first.items()}
    held = first["w1"][0]  # a view keeps w1's storage in use after its .grad is dropped
    for k, w in weights.items():
        torch.testing.assert_close(w.grad, expected[k], atol=1e-5, rtol=1e-5)
        w.grad = None
    del first

    expected = step(11, steps[1])
    for k, w in weights.items():
        torch.testing.assert_close(w.grad, expected[k], atol=1e-5, rtol=1e-5, msg=f"grad of {k}")
        assert torch.all(w.grad[0] == 0), f"{k}: an expert without rows must get a zero gradient"
    torch.testing.assert_close(held, first_values["w1"][0], rtol=0, atol=0, msg="a held gradient was overwritten")
    assert weights["w1"].grad.data_ptr() != held.data_ptr()
    assert weights["w2"].grad.untyped_storage().data_ptr() == module._GRADIENT_BUFFERS[weights["w2"]].data_ptr()
    reused = {k: w.grad.data_ptr() for k, w in weights.items()}
    for w in weights.values():
        w.grad = None

    expected = step(12, steps[2])  # storages free now: written in place, with expert 1 zeroed
    for k, w in weights.items():
        assert w.grad.data_ptr() == reused[k], f"{k}: a dropped gradient's storage was not reused"
        torch.testing.assert_close(w.grad, expected[k], atol=1e-5, rtol=1e-5, msg=f"grad of {k}")
        assert torch.all(w.grad[1] == 0), f"{k}: stale values left in an expert without rows"

    kept = {k: w.grad.clone() for k, w in weights.items()}
    expected = step(13, steps[0])  # .grad kept: the new gradient is summed into it
    for k, w in weights.items():
        torch.testing.assert_close(w.grad, kept[k] + expected[k], atol=1e-5, rtol=1e-5, msg=f"accumulated grad of {k}")

    kernels.release_gradient_buffers()
    assert len(module._GRADIENT_BUFFERS) == 0


@pytest.mark.parametrize("mode", [1, 0])
def test_extension_sums_rows_that_share_a_source_row_within_one_expert(monkeypatch, mode):
    """The operator's definition sums every grouped row into its source row, even two rows of one
    expert reading the same source row (the dispatchers never produce that, the definition allows it)."""
    assert cpu_extension.load() is not None, cpu_extension.build_error()
    monkeypatch.setattr(EXPERT_MLP, "UNIT_PARALLEL", mode)
    counts = [6, 2] + [3] * 8
    _, offsets, tensors = _case(counts, 20, 8, "swiglu", 5, seed=3)
    row_index = torch.tensor([0, 0, 1, 1, 2, 0, 4, 4] + [0, 3, 0] * 8)
    grad = torch.randn(5, 20)
    fused, fused_grads = _run(lambda *a: kernels.expert_mlp(*a, backend="torch"), row_index, offsets, tensors, grad)
    _ran_on(fused, "_ExtensionExpertMLPBackward")
    ref, ref_grads = _run(lambda *a: expert_mlp_reference(*a, backend="loop"), row_index, offsets, tensors, grad)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for name, value in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], value, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("mode", [-1, 1, 0])
def test_cpu_kernel_is_bitwise_deterministic_with_two_threads(monkeypatch, mode):
    """The same inputs give bitwise the same output and gradients on every run at a given thread
    count: which thread runs which expert, and so the order in which each token's contributions are
    summed, depends only on the row counts. Many experts of uneven sizes, with tokens chosen by
    several experts each (as top-k routing does), so a schedule decided at run time would show."""
    assert cpu_extension.load() is not None, cpu_extension.build_error()
    monkeypatch.setattr(EXPERT_MLP, "UNIT_PARALLEL", mode)
    counts = [37, 5, 61, 12, 0, 44, 29, 3, 58, 21, 16, 40]
    row_index, offsets, tensors = _case(counts, 48, 40, "swiglu", 64, seed=5)
    grad = torch.randn(64, 48)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(12):
            out, grads = _run(lambda *a: kernels.expert_mlp(*a, backend="torch"), row_index, offsets, tensors, grad)
            _ran_on(out, "_ExtensionExpertMLPBackward")
            runs.append([out.detach().clone()] + [g.clone() for g in grads.values() if g is not None])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)


def test_extension_rejects_indices_it_would_read_out_of_bounds():
    """Rows and offsets are checked before any raw-pointer loop reads them: one clear error each."""
    extension = cpu_extension.load()
    assert extension is not None, cpu_extension.build_error()
    row_index, offsets, t = _case([2, 3], 4, 6, "swiglu", 5)
    args = [t["x"], row_index, t["row_weight"], offsets, t["w1"], t["w3"], t["w2"], 0, 256, -1]
    bad_rows = row_index.clone()
    bad_rows[3] = 5
    with pytest.raises(RuntimeError, match=r"row_index\[3\] = 5 is outside x's 5 rows"):
        extension.forward(*args[:1], bad_rows, *args[2:])
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        extension.forward(*args[:3], torch.tensor([3, 2], dtype=torch.int32), *args[4:])
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        extension.forward(*args[:3], torch.tensor([2, 6], dtype=torch.int32), *args[4:])
    with pytest.raises(RuntimeError, match="do not fit x"):
        extension.forward(*args[:6], t["w2"][:, :5], *args[7:])
    with pytest.raises(RuntimeError, match="w3 is required for SwiGLU only"):
        extension.forward(*args[:5], None, *args[6:])


def test_cpu_dtypes_the_extension_does_not_handle_run_the_python_path():
    """float64 (or any non-fp32) CPU tensors take the Python implementation, with correct results."""
    row_index, offsets, tensors = _case([4, 0, 5], 6, 7, "swiglu", 8)
    tensors = {k: None if v is None else v.double() for k, v in tensors.items()}
    grad = torch.randn(8, 6, dtype=torch.float64)
    fused, fused_grads = _run(lambda *a: kernels.expert_mlp(*a, backend="torch"), row_index, offsets, tensors, grad)
    _ran_on(fused, "_BlockedExpertMLPBackward")
    ref, ref_grads = _run(lambda *a: expert_mlp_reference(*a, backend="loop"), row_index, offsets, tensors, grad)
    torch.testing.assert_close(fused, ref)
    for name, value in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], value, msg=f"grad of {name}")


def test_extension_shares_experts_between_threads_only_when_that_balances_and_fits():
    """The automatic choice: whole experts per thread when scheduling them largest first leaves no
    thread more than 1.15x its share of the rows, and the other threads' [M, d] accumulators fit
    within the [N, f] budget; otherwise every GEMM on all threads. One thread never shares."""
    extension = cpu_extension.load()
    assert extension is not None, cpu_extension.build_error()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        choose = extension.chooses_unit_parallel
        assert choose([1000, 1100, 900, 1000], 10, 10)  # 2000 rows per thread
        assert choose([1000, 1000], 10, 10)  # one expert per thread
        assert not choose([1000], 10, 10)  # the other thread would idle
        assert not choose([3000, 100, 100, 100, 100], 10, 10)  # one expert holds most rows
        assert choose([1150] + [50] * 17, 10, 10)  # 1150 rows on one thread against a share of 1000
        assert not choose([1151] + [50] * 17, 10, 10)  # just over 1.15x
        assert not choose([1000, 1100, 900, 1000], 11, 10)  # the second thread's accumulator exceeds the budget
        torch.set_num_threads(1)
        assert not choose([1000, 1100, 900, 1000], 10, 10)
    finally:
        torch.set_num_threads(threads)


def test_torch_compile_of_a_cpu_layer_gives_the_eager_outputs_and_gradients():
    """torch.compile runs the C++ kernel eagerly inside a compiled layer (a graph break, without
    Dynamo's warning about an untraceable builtin) and gets the same output and gradients as eager."""
    import moe

    torch.manual_seed(0)
    config = moe.MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=2, router="learned")
    layer = moe.MoELayer(config).train()
    x, grad = torch.randn(40, 16, requires_grad=True), torch.randn(40, 16)

    def run(module):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = module(x)
        out.backward(grad)
        return out.detach(), [x.grad, *(p.grad for p in layer.parameters())]

    eager, eager_grads = run(layer)
    node = layer(x).grad_fn  # the layer's reshape back to x's shape, on top of the experts' output
    assert type(node.next_functions[0][0]).__name__ == "_ExtensionExpertMLPBackward"
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, compiled_grads = run(torch.compile(layer, backend="aot_eager"))
    untraceable = [str(w.message) for w in caught if "does not know how to trace" in str(w.message)]
    assert not untraceable, untraceable[0]
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_a_slow_load_of_the_cpu_kernel_says_it_is_compiling_and_how_long_it_took(monkeypatch, capsys):
    import time

    monkeypatch.setattr(cpu_extension, "_state", {})
    monkeypatch.setattr(cpu_extension, "ANNOUNCE_AFTER_S", 0.05)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(cpu_extension, "_build", lambda: time.sleep(0.3) or "built")
    assert cpu_extension.load() == "built"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "compiling the C++ CPU expert kernel" in lines[0] and "was ready after" in lines[1]
    assert cpu_extension.load() == "built" and capsys.readouterr().err == ""  # built once per process
    monkeypatch.setattr(cpu_extension, "_state", {})
    monkeypatch.setattr(cpu_extension, "_build", lambda: "cached")  # loaded from the cache: quick and quiet
    assert cpu_extension.load() == "cached" and capsys.readouterr().err == ""
    monkeypatch.setattr(cpu_extension, "_state", {})
    monkeypatch.setenv("LOCAL_RANK", "1")  # the other ranks wait for the same build without a word
    monkeypatch.setattr(cpu_extension, "_build", lambda: time.sleep(0.3) or "built")
    assert cpu_extension.load() == "built" and capsys.readouterr().err == ""


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """A killed build leaves torch's ``lock`` file behind; the next process removes it (under its own
    flock, released by the system when its holder dies) and loads the kernel instead of waiting forever."""
    import subprocess
    import sys

    assert cpu_extension.remove_stale_baton(str(tmp_path)) is False
    (tmp_path / "lock").write_text("")
    assert cpu_extension.remove_stale_baton(str(tmp_path)) is True and not (tmp_path / "lock").exists()

    folder = cpu_extension.build_directory()
    if folder is None:
        pytest.skip("this torch does not name the extension's build folder")
    lock = os.path.join(folder, "lock")
    if os.path.exists(lock):  # a build is running right now (or one was killed): not ours to judge
        pytest.skip(f"{lock} exists already")
    open(lock, "w").close()
    code = "from kernels import cpu_extension as c; m = c.load(); print('LOADED' if m is not None else c.build_error())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    finally:
        if os.path.exists(lock):
            os.remove(lock)
    assert done.returncode == 0 and "LOADED" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "a build lock left by an interrupted build" in done.stderr


# ----------------------------------------------------------------------------- "gather" and "auto"


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
def test_gather_backend_matches_the_per_row_loop(counts, activation):
    row_index, offsets, tensors = _case(counts, d=12, f=10, activation=activation, num_source=9, seed=len(counts))
    grad = torch.randn(9, 12, generator=torch.Generator().manual_seed(1))
    out, grads = _run(lambda *a: kernels.expert_mlp(*a, activation=activation, backend="gather"),
                      row_index, offsets, tensors, grad)
    ref, ref_grads = _run(lambda *a: _per_row(*a[:3], counts, *a[4:], activation), row_index, offsets, tensors, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        if g is not None:
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gather_backend_ignores_rows_past_the_last_group():
    """Rows after offsets[-1] belong to no expert (capacity dropping cuts them): they add nothing."""
    row_index, offsets, tensors = _case([2, 3], d=8, f=6, activation="swiglu", num_source=6)
    extra = torch.tensor([0, 4])
    longer = torch.cat([row_index, extra])
    weights = torch.cat([tensors["row_weight"], torch.ones(2)])
    args = (tensors["w1"], tensors["w3"], tensors["w2"])
    cut = kernels.expert_mlp(tensors["x"], row_index, tensors["row_weight"], offsets, *args, backend="gather")
    padded = kernels.expert_mlp(tensors["x"], longer, weights, offsets, *args, backend="gather")
    torch.testing.assert_close(padded, cut)


CUDA_BF16 = dict(device_type="cuda", element_size=2, swiglu=True, grouped_mm_supported=True, compiling=False)


@pytest.mark.parametrize(
    "shape, expected",
    [  # (d, f, E, k, T) of issue 17's H100 table, and what won there
        ((4096, 14336, 8, 2, 16384), "torch"),  # F.grouped_mm 584 TFLOP/s vs Triton 417
        ((2048, 1408, 64, 6, 16384), "triton"),  # Triton 384 vs 328
        ((1024, 512, 128, 8, 16384), "triton"),  # Triton 258 vs 175
        ((4096, 14336, 8, 2, 8), "triton"),  # decoding: a few rows per expert
    ],
)
def test_auto_takes_the_path_that_won_on_the_h100(shape, expected):
    d, f, E, k, T = shape
    assert EXPERT_MLP.choose_backend(num_rows=T * k, num_experts=E, hidden=d, ffn=f, **CUDA_BF16) == expected


def test_auto_keeps_to_triton_where_grouped_mm_cannot_run_and_to_cpu_paths_elsewhere():
    big = dict(num_rows=32768, num_experts=8, hidden=4096, ffn=14336)
    assert EXPERT_MLP.choose_backend(**big, **dict(CUDA_BF16, grouped_mm_supported=False)) == "triton"
    cpu = dict(device_type="cpu", element_size=4, swiglu=True, grouped_mm_supported=False)
    assert EXPERT_MLP.choose_backend(**big, **cpu, compiling=False) == "torch"
    assert EXPERT_MLP.choose_backend(**big, **cpu, compiling=True) == "torch"  # too large to gather
    decode = dict(num_rows=16, num_experts=8, hidden=128, ffn=128)
    assert EXPERT_MLP.choose_backend(**decode, **cpu, compiling=True) == "gather"
    assert EXPERT_MLP.choose_backend(**decode, **cpu, compiling=False) == "torch"


def test_auto_on_cpu_runs_the_cpu_kernel_and_matches_the_loop():
    row_index, offsets, tensors = _case([4, 0, 3], d=8, f=8, activation="swiglu", num_source=7)
    grad = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    out, grads = _run(lambda *a: kernels.expert_mlp(*a, backend="auto"), row_index, offsets, tensors, grad)
    ref, ref_grads = _run(lambda *a: kernels.expert_mlp(*a, backend="loop"), row_index, offsets, tensors, grad)
    assert "Extension" in type(out.grad_fn).__name__ or "Blocked" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        if g is not None:
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_config_and_kernel_name_the_same_backends():
    from moe import config

    assert config.EXPERT_BACKENDS == EXPERT_MLP.EXPERT_BACKENDS
