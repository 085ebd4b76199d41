"""``moe bench layer`` end to end on a tiny shape: every column measured, ratios from the times; its
options (shapes with an optional T, per-device defaults) and the three columns computing one function."""

import json
import math
import re
from statistics import median

import pytest
import torch

from launch.bench import layer as bl
from launch.cli import main

TIME_KEYS = ("ours_ms", "deepspeed_ms", "dense_mlp_ms", "dense_gemm_ms", "expert_gemm_ms")
RATIOS = {  # ratio key: (numerator, denominator)
    "ours_per_dense_mlp": ("ours_ms", "dense_mlp_ms"),
    "ours_per_dense_gemm": ("ours_ms", "dense_gemm_ms"),
    "expert_per_dense_gemm": ("expert_gemm_ms", "dense_gemm_ms"),
    "deepspeed_per_dense_mlp": ("deepspeed_ms", "dense_mlp_ms"),
    "speedup_vs_deepspeed": ("deepspeed_ms", "ours_ms"),
}


def test_bench_layer_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "layer", "--device", "cpu", "--tokens", "64", "--shapes", "16,32,4,2", "--repeats", "4",
            "--json", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ours/MLP" in printed and "minor page faults per step" in printed

    report = json.loads(path.read_text())
    assert report["tokens"] == 64 and report["threads"] >= 1
    assert (report["device"], report["dtype"], report["activation"]) == ("cpu", "float32", "swiglu")  # CPU defaults
    (row,) = report["results"]
    assert row["shape"] == {"d": 16, "f": 32, "E": 4, "k": 2, "T": 64}  # T from --tokens
    assert row["deepspeed_error"] is None
    assert row["ours_expert_path"].startswith("auto -> torch: ")  # the CPU kernel
    rounds = row["rounds_ms"]
    for key in TIME_KEYS:
        assert len(rounds[key]) == 4 and all(math.isfinite(t) and t > 0 for t in rounds[key]), key
        assert row[key] == median(rounds[key]), key
    for key, (numerator, denominator) in RATIOS.items():  # the median of the per-round ratios
        assert abs(row[key] - median([n / d for n, d in zip(rounds[numerator], rounds[denominator])])) <= 1e-12, key
    for key in TIME_KEYS:  # minor page faults: a count per round, the median reported
        counts = row["rounds_page_faults"][key]
        assert len(counts) == 4 and all(isinstance(c, int) and c >= 0 for c in counts), key
        assert row["page_faults_per_step"][key] == median(counts), key
    per_round = sorted(o / m for o, m in zip(rounds["ours_ms"], rounds["dense_mlp_ms"]))
    q1, q3 = row["ours_per_dense_mlp_iqr"]
    assert per_round[0] <= q1 <= row["ours_per_dense_mlp"] <= q3 <= per_round[-1]
    assert row["ours_host_ms"] is None and "ours_host_ms" not in rounds  # CUDA only
    assert row["torch_routing_ms"] is None and "torch_routing_ms" not in rounds  # CUDA only
    assert row["routing_kernel_speedup"] is None
    # the profile (3 more calls by default): ours and the dense MLP, ops and their self CPU time
    assert set(row["profiles"]) == set(bl.PROFILED)
    for key, profile in row["profiles"].items():
        assert profile["steps"] == bl.PROFILE_CALLS and profile["what"] == "ops by self CPU time", key
        assert profile["calls_per_step"] >= 1 and profile["total_ms_per_step"] > 0, key
        shares = [kernel["share"] for kernel in profile["kernels"]]
        assert 1 <= len(shares) <= bl.PROFILE_TOP and shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    summary = bl.profile_summary(row)
    assert summary["ours_busy_share"] is None  # CUDA only
    assert summary["ours_calls"] == row["profiles"]["ours_ms"]["calls_per_step"]
    fake_gpu = {"ours_ms": 4.0, "profiles": {"ours_ms": {"what": "CUDA kernels by device time", "total_ms_per_step": 3.0,
                                                         "calls_per_step": 40.0}}}
    assert bl.profile_summary(fake_gpu)["ours_busy_share"] == pytest.approx(0.75)
    assert "where the time goes (torch.profiler over 3 more calls per shape; ops by self CPU time" in printed
    assert "top ops of ours at 16,32,4,64" not in printed and "top ops of ours at 16,32,4,2,64" in printed


def _table(printed: str) -> list[dict]:
    """The rows of the printed table, as {header: cell}."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(bl.SHAPE_HEADER + " "))
    headers = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(dict(zip(headers, re.split(r"\s{2,}", line.strip()))))
    return rows


def test_bench_layer_gelu_smoke_prints_ratios_that_are_the_printed_quotients(capsys):
    """One round: each printed ratio is the quotient of the two printed times (each printed to 0.01,
    so the quotient is only known to an interval)."""
    argv = ["bench", "layer", "--device", "cpu", "--activation", "gelu", "--shapes", "16,32,4,2,48", "--repeats", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fp32, gelu experts" in printed
    (row,) = _table(printed)
    assert row[bl.SHAPE_HEADER] == "16,32,4,2,48"
    headers = {key: header for key, header, _ in bl.COLUMNS}
    times = {key: float(row[headers[key]]) for key in TIME_KEYS}
    assert all(t >= 0 for t in times.values()), times
    for key, (numerator, denominator) in RATIOS.items():
        cell = row[headers[key]]
        assert cell.endswith("x"), (key, cell)
        ratio, top, bottom = float(cell[:-1]), times[numerator], times[denominator]
        low = (top - 0.005) / (bottom + 0.005) - 0.005
        high = math.inf if bottom <= 0.005 else (top + 0.005) / (bottom - 0.005) + 0.005
        assert low <= ratio <= high, (key, ratio, top, bottom)
    low, high = (float(v) for v in row[headers["ours_per_dense_mlp_iqr"]].split("-"))
    assert low == high == float(row[headers["ours_per_dense_mlp"]][:-1])  # one round: both quartiles are it
    assert re.search(r"^  16,32,4,2,48: auto -> torch: the .*CPU expert kernel", printed, re.M)
    ours_per_mlp = float(row[headers["ours_per_dense_mlp"]][:-1])
    verdict = "yes" if ours_per_mlp <= bl.TARGET_OURS_PER_DENSE_MLP else "NO"
    assert f"16,32,4,2,48: ours/MLP <= 1.3: {verdict}; faster than deepspeed: " in printed
    assert "deepspeed n/a" not in printed


def test_bench_layer_without_a_profile(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "layer", "--device", "cpu", "--shapes", "16,32,4,2,32", "--repeats", "1", "--profile-calls", "0",
            "--json", str(path)]
    assert main(argv) == 0
    assert "where the time goes" not in capsys.readouterr().out
    (row,) = json.loads(path.read_text())["results"]
    assert row["profiles"] == {} and bl.profile_summary(row) is None
    assert main(argv[:-4] + ["--profile-calls", "-1"]) != 0
    assert "--profile-calls must be >= 0, got -1" in capsys.readouterr().err


def test_shapes_take_an_optional_token_count():
    assert bl.parse_layer_shapes("16,32,4,2;8,16,8,3,100 ; ", tokens=64) == [(16, 32, 4, 2, 64), (8, 16, 8, 3, 100)]
    assert bl.parse_layer_shapes(bl.DEFAULT_SHAPES_CUDA, tokens=1) == [
        (4096, 14336, 8, 2, 8192), (2048, 1408, 64, 6, 8192), (1024, 512, 64, 2, 16384)]
    bad = {
        "16,32,4": 'is not "d,f,E,k[,T]" with four or five positive integers',
        "16,32,4,2,64,1": 'is not "d,f,E,k[,T]" with four or five positive integers',
        "16,32,4,2,0": "is not \"d,f,E,k,T\" with five positive integers",
        "16,32,x,2": "is not \"d,f,E,k\" with four positive integers",
        "16,32,4,5,64": "has k=5 > E=4",
        " ; ": "no shape given",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match="--shapes") as caught:
            bl.parse_layer_shapes(text, tokens=64)
        assert message in str(caught.value), (text, str(caught.value))


def test_defaults_follow_the_device(monkeypatch):
    device, dtype, activation, shapes = bl.resolve_options("cpu", None, None, None, tokens=128)
    assert (device, dtype, activation) == (torch.device("cpu"), torch.float32, "swiglu")
    assert shapes == [(*shape, 128) for shape in bl.parse_shapes(bl.DEFAULT_SHAPES)]
    assert bl.resolve_options("cpu", "bf16", "gelu", "8,16,2,1", 4)[1:] == (torch.bfloat16, "gelu", [(8, 16, 2, 1, 4)])

    import moe.devices

    monkeypatch.setattr(moe.devices, "resolve_device", lambda device: torch.device("cuda", 0))  # no GPU needed
    device, dtype, activation, shapes = bl.resolve_options(None, None, None, None, tokens=128)
    assert (device, dtype, activation) == (torch.device("cuda", 0), torch.bfloat16, "gelu")  # issue 17's table
    assert shapes == bl.parse_layer_shapes(bl.DEFAULT_SHAPES_CUDA, 1)
    with pytest.raises(ValueError, match="--tokens must be >= 1"):
        bl.resolve_options("cpu", None, None, None, tokens=0)


@pytest.fixture
def deepspeed_on_cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return pytest.importorskip("deepspeed.moe.layer")


@pytest.mark.parametrize("activation", bl.ACTIVATIONS)
def test_the_three_columns_compute_the_same_function(activation, deepspeed_on_cpu):
    """One expert, k=1: ours, deepspeed's layer (our weights copied in) and the dense MLP on the same
    weights give the same output; with 4 experts and k=2, ours and deepspeed's still agree (both
    route the same way and normalise the k gate weights)."""
    torch.manual_seed(0)
    x = torch.randn(24, 16)
    ours = bl.build_ours(16, 32, 1, 1, activation, torch.device("cpu"), torch.float32)
    assert (ours.experts.w3 is None) == (activation == "gelu")
    deepspeed = bl.build_deepspeed(ours, k=1)
    experts = ours.experts
    with torch.no_grad():
        expected = bl.dense_mlp(x, experts.w1[0], experts.w3[0] if experts.w3 is not None else None, experts.w2[0])
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deepspeed(x)[0], expected, rtol=1e-5, atol=1e-5)

    ours = bl.build_ours(16, 32, 4, 2, activation, torch.device("cpu"), torch.float32)
    deepspeed = bl.build_deepspeed(ours, k=2)
    with torch.no_grad():
        torch.testing.assert_close(deepspeed(x)[0], ours(x), rtol=1e-5, atol=1e-5)


def test_deepspeed_in_bf16_keeps_its_gate_fp32_like_our_router(deepspeed_on_cpu):
    ours = bl.build_ours(16, 32, 4, 2, "gelu", torch.device("cpu"), torch.bfloat16)
    deepspeed = bl.build_deepspeed(ours, k=2)
    assert ours.router.weight.dtype == torch.float32 and ours.experts.w1.dtype == torch.bfloat16
    gate = deepspeed.deepspeed_moe.gate.wg.weight
    assert gate.dtype == torch.float32 and torch.equal(gate, ours.router.weight)
    expert_weights = [p for n, p in deepspeed.named_parameters() if "deepspeed_experts" in n]
    assert expert_weights and all(p.dtype == torch.bfloat16 for p in expert_weights)
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs, mine = deepspeed(x)[0], ours(x)
    assert theirs.dtype == mine.dtype == torch.bfloat16
    torch.testing.assert_close(theirs.float(), mine.float(), rtol=2e-2, atol=2e-2)  # same routing, bf16 rounding


def test_auto_path_note_names_choose_backends_answer():
    from kernels.expert_mlp import choose_backend

    ours = bl.build_ours(16, 32, 4, 2, "swiglu", torch.device("cpu"), torch.float32)
    x = torch.randn(8, 16)
    assert choose_backend("cpu", 16, 4, 16, 32, 4, True, False, False) == "torch"
    assert bl.auto_expert_path(ours, x, 2).startswith("auto -> torch: ")
    ours.experts.backend = "loop"  # a backend set by hand is named as it is
    assert bl.auto_expert_path(ours, x, 2) == "loop (per-expert loop)"


def test_bench_ep_counts_the_bytes_the_formula_predicts(tmp_path, capsys):
    """`moe bench ep` on 2 real ranks: EP=1 exchanges nothing; at EP=2 the bytes the dispatcher
    counted match 4 L T k d b (P-1)/P (random tokens route near-uniformly; 10% slack); the
    overlapped rows (2 chunks) send the same bytes and give the serial path's loss and gradients."""
    from launch.cli import main

    report_path = tmp_path / "ep.json"
    assert main(["bench", "ep", "--steps", "1", "--warmup", "0", "--chunks", "2", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    overlapped = [r for r in report["results"] if r.get("chunks", 1) > 1]
    assert {(r["config"], r["ep"], r["chunks"]) for r in overlapped} == {("tiny", 2, 2), ("fine-grained", 2, 2)}
    for row in overlapped:
        assert 0.9 < row["mb_sent"] / row["formula_mb"] < 1.1 and row["loss_diff"] <= 1e-6 and row["grad_diff"] <= 1e-6, row
        assert 0 <= row["blocked_ms"] <= row["step_ms"]
    rows = {(r["config"], r["ep"]): r for r in report["results"] if r.get("chunks", 1) == 1}
    assert set(rows) == {("tiny", 1), ("tiny", 2), ("fine-grained", 1), ("fine-grained", 2)}
    for (_, ep), row in rows.items():
        assert row["step_ms"] > 0
        if ep == 1:
            assert row["mb_sent"] == 0 and row["a2a_ms"] == 0
        else:
            assert 0.9 < row["mb_sent"] / row["formula_mb"] < 1.1, row
            assert 0 < row["a2a_share"] < 1
    printed = capsys.readouterr().out
    assert "measured / formula bytes at EP=2" in printed


def test_torch_routing_column_runs_ours_without_the_routing_kernels(monkeypatch):
    """The CUDA column "torch-routing ms" times the same layer with the routing kernels switched off:
    checked on CPU with the Triton path in the interpreter, by which router and grouping each call takes."""
    import kernels
    from kernels.triton_ops import triton_usable

    if not triton_usable(torch.zeros(1)):
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py on machines without CUDA)")
    monkeypatch.setenv("SLIMMOE_TRITON_ON_CPU", "1")
    calls = []
    for name in ("topk_route_triton", "group_by_expert_triton"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    ours = bl.build_ours(16, 16, 4, 2, "gelu", torch.device("cpu"), torch.float32)
    x, grad = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    bl._backward_step(ours, x, grad)()
    assert calls == ["topk_route_triton", "group_by_expert_triton"]
    calls.clear()
    step = bl._torch_routing_step(ours, x, grad)
    step()
    assert calls == [] and x.grad is not None
    bl._backward_step(ours, x, grad)()  # switched off for that call only
    assert calls == ["topk_route_triton", "group_by_expert_triton"]
