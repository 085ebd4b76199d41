"""``moe bench kernels``: the pure parts on CPU (FLOPs, shapes, routing, grouping, the table) and the
one-line error without CUDA. The GPU measurement itself is a benchmark, not a test."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from launch.bench import kernels as bk


def test_swiglu_flops_match_a_hand_count():
    # Mixtral-like: 16384 tokens x 2 experts = 32768 routed rows; each does x @ w1 and x @ w3
    # ([1, 4096] x [4096, 14336]) and act @ w2 ([1, 14336] x [14336, 4096]): 3 matmuls of
    # 4096 * 14336 multiply-adds, 2 FLOPs each.
    per_row = 3 * 2 * 4096 * 14336
    assert bk.swiglu_forward_flops(d=4096, f=14336, k=2, tokens=16384) == 32768 * per_row == 11_544_872_091_648
    assert bk.swiglu_forward_backward_flops(4096, 14336, 2, 16384) == 3 * 11_544_872_091_648
    # The dense chain does exactly the forward's FLOPs: [N, d] x [d, 2f] and [N, f] x [f, d].
    assert bk.dense_chain_forward_flops(d=2048, f=1408, rows=16384 * 6) == bk.swiglu_forward_flops(2048, 1408, 6, 16384)
    assert bk.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert bk.tflops(1e12, None) is None


def test_parse_shapes_defaults_and_errors():
    assert bk.parse_shapes(bk.DEFAULT_SHAPES) == [(4096, 14336, 8, 2, 16384), (2048, 1408, 64, 6, 16384),
                                                  (1024, 512, 128, 8, 16384)]  # issue 17 added the third
    assert set(bk.TARGET_DENSE_SHAPES) == set(bk.parse_shapes(bk.DEFAULT_SHAPES)[:2])
    assert bk.BACKENDS[0] == "auto"  # the default backend is measured first
    assert bk.parse_shapes(" 16,32,4,2,64 ; ") == [(16, 32, 4, 2, 64)]
    bad = {
        "16,32,4,2": "is not \"d,f,E,k,T\" with five positive integers",
        "16,32,4,2,x": "is not \"d,f,E,k,T\" with five positive integers",
        "16,32,4,0,64": "is not \"d,f,E,k,T\" with five positive integers",
        "16,32,4,5,64": "has k=5 > E=4",
        " ; ": "no shape given",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match="--shapes") as caught:
            bk.parse_shapes(text)
        assert message in str(caught.value), (text, str(caught.value))
    with pytest.raises(ValueError, match="--backends: 'triton,cutlass' is not a comma-separated list"):
        bk.parse_choices("triton,cutlass", bk.BACKENDS, "--backends")
    assert bk.parse_choices("loop, torch,loop", bk.BACKENDS, "--backends") == ["loop", "torch"]


@pytest.mark.parametrize("routing", bk.ROUTINGS)
@pytest.mark.parametrize("experts, top_k", [(8, 2), (64, 6), (4, 4)])
def test_routing_has_distinct_experts_and_counts_sum_to_t_times_k(routing, experts, top_k):
    tokens = 512
    indices, weights = bk.make_routing(tokens, experts, top_k, routing, seed=3)
    assert indices.shape == weights.shape == (tokens, top_k) and indices.dtype == torch.int64
    assert indices.min() >= 0 and indices.max() < experts
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts per token
    assert int(torch.bincount(indices.flatten(), minlength=experts).sum()) == tokens * top_k
    assert torch.allclose(weights.sum(dim=1), torch.ones(tokens)) and (weights > 0).all()
    again, _ = bk.make_routing(tokens, experts, top_k, routing, seed=3)
    assert torch.equal(indices, again)  # seeded


def test_skewed_routing_is_skewed_and_uniform_is_not():
    """T=4096, E=8, k=2. Uniform: each expert's count has mean T*k/E = 1024 and standard deviation
    about sqrt(4096 * 0.25 * 0.75) = 28 (2.7%), so max/mean is about 1.05 and 1.25 is > 8 sigma away.
    Skewed: with Zipf(1.2) popularity p and two draws without replacement, expert 0 is chosen by a
    fraction p0 + sum_j p_j * p0 / (1 - p_j) = 0.70 of the tokens, i.e. max/mean = 0.70 / (k/E) = 2.8
    (standard deviation 0.03 at this T), so 2.0 is far below it and far above the uniform case."""
    tokens, experts, top_k = 4096, 8, 2
    uniform, _ = bk.make_routing(tokens, experts, top_k, "uniform", seed=0)
    skewed, _ = bk.make_routing(tokens, experts, top_k, "skewed", seed=0)
    assert bk.load_imbalance(uniform, experts) < 1.25
    assert bk.load_imbalance(skewed, experts) > 2.0

    p = bk.expert_popularity(experts, "skewed")
    assert torch.all(p[:-1] > p[1:]) and float(p.sum()) == pytest.approx(1.0)
    expected_share = float(p[0] + sum(p[j] * p[0] / (1 - p[j]) for j in range(1, experts)))
    assert expected_share == pytest.approx(0.70, abs=0.01)
    measured_share = float((skewed == 0).any(dim=1).float().mean())
    assert measured_share == pytest.approx(expected_share, abs=0.03)  # the documented law, not another one


@pytest.mark.parametrize("routing", bk.ROUTINGS)
def test_grouping_agrees_with_the_layers_dispatcher(routing):
    from moe.dispatch import sort_by_expert
    from moe.routers import Routing

    from kernels import offsets_from_counts

    tokens, experts, top_k = 300, 16, 3
    indices, weights = bk.make_routing(tokens, experts, top_k, routing, seed=1)
    row_index, row_weight, offsets, tokens_per_expert, source_order = bk.group_by_expert(indices, weights, experts)

    counts = torch.bincount(indices.flatten(), minlength=experts)
    layer = sort_by_expert(torch.zeros(tokens, 4), Routing(indices, weights, counts, counts), experts)
    assert torch.equal(row_index, layer.row_index)
    assert torch.equal(row_weight, layer.row_weight)
    assert torch.equal(tokens_per_expert, layer.tokens_per_expert)
    assert offsets.dtype == torch.int32 and torch.equal(offsets, offsets_from_counts(layer.tokens_per_expert))
    assert int(offsets[-1]) == tokens * top_k
    # token t's k grouped rows, as the experts sum them
    assert torch.equal(row_index[source_order].view(tokens, top_k), torch.arange(tokens)[:, None].expand(-1, top_k))
    # Group e really holds the tokens that chose e, in token order.
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        rows = row_index[start:end]
        assert torch.equal(rows, (indices == expert).any(dim=1).nonzero().flatten())
        start = end


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe bench")
    bk.add_parser(parser.add_subparsers(dest="bench"))
    return parser.parse_args(["kernels", *argv])


def test_without_cuda_the_command_fails_with_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _parsed(["--out", str(tmp_path / "k.md")])
    assert args.func is bk.run and args.shapes == bk.DEFAULT_SHAPES
    with pytest.raises(ValueError) as caught:
        bk.run(args)
    message = str(caught.value)
    assert message.startswith("moe bench kernels needs a CUDA GPU; ") and "\n" not in message
    assert not (tmp_path / "k.md").exists()
    with pytest.raises(ValueError, match="has k=9 > E=8"):  # argument errors come first, also on CPU
        bk.run(_parsed(["--shapes", "64,64,8,9,128"]))


def _fake_report() -> dict:
    """FAKE numbers, made up for this formatting test: nothing here was measured."""
    shape = {"d": 64, "f": 128, "E": 8, "k": 2, "T": 256}
    rows = [{"shape": shape, "routing": None, "max_over_mean_load": None, "backend": "dense",
             "fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "note": None}]
    fake_ms = {"auto": (2.0, 5.0), "triton": (2.0, 5.0), "torch": (3.0, 7.5), "loop": (8.0, 20.0)}
    notes = {"torch": "F.grouped_mm", "auto": "took triton (the Triton kernels)"}
    for routing, slower, load in (("uniform", 1.0, 1.01), ("skewed", 1.5, 2.8)):
        for backend, (fwd, fwd_bwd) in fake_ms.items():
            rows.append({"shape": shape, "routing": routing, "max_over_mean_load": load, "backend": backend,
                         "fwd_ms": fwd * slower, "fwd_bwd_ms": fwd_bwd * slower, "fwd_bwd_extra_gib": 0.5,
                         "rel_err_vs_loop": 1e-3, "note": notes.get(backend)})
            if backend == "auto":
                rows[-1].update(auto_path="triton", auto_path_text="triton (the Triton kernels)")
    rows.append({"shape": {**shape, "E": 64, "k": 6}, "routing": "uniform", "max_over_mean_load": 1.1,
                 "backend": "triton", "fwd_ms": None, "fwd_bwd_ms": None, "fwd_bwd_extra_gib": None,
                 "rel_err_vs_loop": None, "note": "unavailable: ValueError: expert_mlp: unknown backend 'triton' | x"})
    return {"gpu": "FAKE GPU", "capability": "9.0", "sms": 132, "torch": "0.0-fake", "cuda": "0.0", "triton": "0.0",
            "date": "1970-01-01 00:00 UTC", "warmup": 1, "repeats": 1, "seed": 0, "results": bk.add_derived(rows)}


def test_derived_ratios_follow_from_the_times():
    rows = {(r["shape"]["E"], r["routing"], r["backend"]): r for r in _fake_report()["results"]}
    torch_uniform, loop_skewed = rows[(8, "uniform", "torch")], rows[(8, "skewed", "loop")]
    triton_uniform = rows[(8, "uniform", "triton")]
    assert triton_uniform["fwd_of_dense"] == pytest.approx(1.0 / 2.0)  # dense ms / triton ms
    assert triton_uniform["fwd_bwd_of_dense"] == pytest.approx(3.0 / 5.0)
    assert triton_uniform["triton_speedup_fwd"] is None
    assert torch_uniform["triton_speedup_fwd"] == pytest.approx(1.5)  # torch ms / triton ms
    assert loop_skewed["triton_speedup_fwd_bwd"] == pytest.approx(4.0)
    assert loop_skewed["skewed_over_uniform_fwd"] == pytest.approx(1.5)
    assert torch_uniform["skewed_over_uniform_fwd"] is None
    flops = bk.swiglu_forward_flops(64, 128, 2, 256)
    assert triton_uniform["fwd_tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    assert triton_uniform["fwd_bwd_tflops"] == pytest.approx(3 * flops / 5e-3 / 1e12)
    assert rows[(8, None, "dense")]["fwd_of_dense"] is None
    unavailable = rows[(64, "uniform", "triton")]
    assert unavailable["fwd_tflops"] is None and unavailable["fwd_of_dense"] is None
    # target 1 on the auto rows: torch ms / auto ms, and the check (this fake shape binds only the torch part)
    auto_uniform, auto_skewed = rows[(8, "uniform", "auto")], rows[(8, "skewed", "auto")]
    assert auto_uniform["torch_over_this_fwd_bwd"] == pytest.approx(7.5 / 5.0)
    assert auto_skewed["torch_over_this_fwd_bwd"] == pytest.approx(7.5 / 5.0)
    assert rows[(8, "uniform", "loop")]["torch_over_this_fwd_bwd"] == pytest.approx(7.5 / 20.0)
    assert torch_uniform["torch_over_this_fwd_bwd"] is None and torch_uniform["target_1"] is None
    assert auto_uniform["target_1"] == "dense -, torch yes"
    assert triton_uniform["target_1"] is None


def test_target_1_check():
    mixtral, fine = bk.TARGET_DENSE_SHAPES[0], (1024, 512, 128, 8, 16384)
    assert bk.target_1_check(mixtral, 0.70, 1.0, "triton") == "dense yes, torch yes"
    assert bk.target_1_check(mixtral, 0.69, 0.99, "triton") == "dense NO, torch NO"
    assert bk.target_1_check(mixtral, 0.75, 0.98, "torch") == "dense yes, torch same"  # one path timed twice
    assert bk.target_1_check(fine, 0.10, 1.2, "triton") == "dense -, torch yes"  # 70% binds on two shapes only
    assert bk.target_1_check(fine, 0.5, None, "triton") == "dense -, torch -"
    assert bk.target_1_check(mixtral, None, None, "triton") is None


def test_table_renders_every_column_and_the_unavailable_reason():
    report = _fake_report()
    text = bk.format_report(report)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| d,f,E,k,T"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [h for _, h, _, _ in bk.COLUMNS]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(report["results"])
    for line in table:  # an escaped pipe inside a note does not split its cell
        assert len(re.split(r"(?<!\\)\|", line)) == len(bk.COLUMNS) + 2, line
    for expected in ("FAKE GPU", "torch 0.0-fake", "triton 0.0", "1970-01-01", "Zipf", "uniformly at random"):
        assert expected in text
    torch_row = next(line for line in table if "| uniform |" in line and "| torch |" in line)
    tflops = f"{bk.swiglu_forward_flops(64, 128, 2, 256) / 3e-3 / 1e12:.3g}"  # fake 3 ms forward
    for cell in ("3.000", tflops, "7.500", "33%", "40%", "1.50x", "F.grouped_mm", "1.0e-03", "0.50"):
        assert f"| {cell} |" in torch_row, (cell, torch_row)
    skewed_loop = next(line for line in table if "| skewed |" in line and "| loop |" in line)
    assert "| 2.80 |" in skewed_loop and "| 1.50x |" in skewed_loop
    auto_row = next(line for line in table if "| uniform |" in line and "| auto |" in line)
    assert "| dense -, torch yes |" in auto_row and "| took triton (the Triton kernels) |" in auto_row
    assert ("- 64,128,8,2,256: triton (the Triton kernels); target 1: uniform dense -, torch yes; "
            "skewed dense -, torch yes") in lines  # the path auto took and the checks, per shape
    assert "unavailable: ValueError: expert_mlp: unknown backend 'triton' \\| x" in text


def test_measurement_code_path_runs_end_to_end_on_cpu():
    """Smoke test of what the command runs on the GPU, here on CPU in fp32 with one tiny shape (wall
    times, no memory figure; the numbers mean nothing). Off CUDA, expert_mlp's "triton" silently runs
    the torch path; on a GPU where the Triton kernels cannot run, the row must carry the reason, not crash."""
    rows = bk.measure([(16, 32, 4, 2, 24)], bk.BACKENDS, bk.ROUTINGS, warmup=0, repeats=1, seed=0,
                      device="cpu", dtype=torch.float32)
    assert [(r["routing"], r["backend"]) for r in rows] == [(None, "dense")] + [
        (routing, backend) for routing in bk.ROUTINGS for backend in bk.BACKENDS]
    for row in rows:
        if row["backend"] in ("dense", "auto", "torch", "loop"):
            assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_tflops"] > 0, row
        if row["backend"] in ("auto", "torch", "loop"):
            assert row["rel_err_vs_loop"] < 1e-5 and row["fwd_of_dense"] > 0, row
        if row["backend"] == "auto":  # on the CPU, choose_backend takes the CPU kernel ("torch")
            assert row["auto_path"] == "torch" and row["note"].startswith("took torch (the CPU expert kernel)"), row
            assert row["torch_over_this_fwd_bwd"] > 0 and row["target_1"] == "dense -, torch same", row
        if row["routing"] == "skewed" and row["backend"] != "triton":
            assert row["skewed_over_uniform_fwd"] > 0 and row["max_over_mean_load"] >= 1
        if row["backend"] == "triton" and row["fwd_ms"] is None:
            assert row["note"].startswith(("unavailable: ", "failed: ")), row
    text = bk.format_report({"gpu": "cpu (smoke test)", "capability": "-", "sms": 0, "torch": "", "cuda": None,
                             "triton": "", "date": "", "warmup": 0, "repeats": 1, "seed": 0, "results": rows})
    assert "| loop |" in text and "- 16,32,4,2,24: torch (the CPU expert kernel); target 1: uniform " in text
