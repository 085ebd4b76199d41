"""``moe bench layer`` end to end on a tiny shape: every column measured, ratios from the times."""

import json
import math
from statistics import median

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
    argv = ["bench", "layer", "--tokens", "64", "--shapes", "16,32,4,2", "--repeats", "4", "--json", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ours/MLP" in printed and "minor page faults per step" in printed

    report = json.loads(path.read_text())
    assert report["tokens"] == 64 and report["threads"] >= 1
    (row,) = report["results"]
    assert row["shape"] == {"d": 16, "f": 32, "E": 4, "k": 2}
    assert row["deepspeed_error"] is None
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


def test_bench_ep_counts_the_bytes_the_formula_predicts(tmp_path, capsys):
    """`moe bench ep` on 2 real ranks: EP=1 exchanges nothing; at EP=2 the bytes the dispatcher
    counted match 4 L T k d b (P-1)/P (random tokens route near-uniformly; 10% slack)."""
    from launch.cli import main

    report_path = tmp_path / "ep.json"
    assert main(["bench", "ep", "--steps", "1", "--warmup", "0", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    rows = {(r["config"], r["ep"]): r for r in report["results"]}
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
