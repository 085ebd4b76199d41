"""`moe bench decode`: the weight bytes a decode step reads at each k, the slimming ratio, and a
CPU smoke run whose printed ratio is the quotient of its printed times."""

from __future__ import annotations

import re

import pytest
import torch

from launch.bench.decode import slimming_ratios, weight_bytes_per_step
from launch.cli import main
from moe import ModelConfig, MoEConfig, MoETransformer


def _model(tie: bool) -> MoETransformer:
    return MoETransformer(ModelConfig(vocab_size=64, num_layers=2, num_heads=2, max_seq_len=32, moe_every=2,
                                      tie_embeddings=tie,
                                      moe=MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=4, top_k=1)))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("k, batch, reached", [(1, 1, 1), (2, 1, 2), (1, 3, 3), (2, 3, 4), (4, 1, 4)])
def test_weight_bytes_count_the_experts_a_batch_can_reach(tie, k, batch, reached):
    model = _model(tie)
    layer = model.blocks[0].ffn
    expert_params = {id(p) for p in layer.experts.parameters()}
    others = [p for p in model.parameters() if id(p) not in expert_params]
    per_expert = sum(w[0].numel() for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2))
    # tied: the table is read whole as the LM head; untied: the embedding reads only the B looked-up rows
    embedding = 0 if tie else batch * 8 - model.embed.weight.numel()
    expected = 4 * (sum(p.numel() for p in others) + embedding + reached * per_expert)
    assert weight_bytes_per_step(model, k, batch) == expected


def test_slimming_ratio_is_the_smallest_k_over_the_largest():
    rows = [{"k": 4, "static_ms": 2.0, "graph_ms": None}, {"k": 1, "static_ms": 0.5, "graph_ms": 1.0}]
    assert slimming_ratios(rows, ("static", "graph")) == {"static": 0.25, "graph": None}
    assert slimming_ratios(rows[:1], ("static",)) == {"static": None}


def test_a_cpu_run_prints_times_whose_quotient_is_the_printed_ratio(capsys):
    assert main(["bench", "decode", "--batch", "2", "--k", "1,8", "--tokens", "3", "--warmup", "1",
                 "--prompt-len", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {int(m.group(1)): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\d+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    assert set(rows) == {1, 8}
    ratio = re.search(r"decode at k=1 / decode at k=8: growing ([\d.]+)x, static ([\d.]+)x", out)
    assert ratio, out
    for column in (0, 1):
        assert float(ratio.group(column + 1)) == pytest.approx(rows[1][column] / rows[8][column], abs=0.006 + 1e-3 *
                                                                 rows[1][column] / rows[8][column])


def test_bad_arguments_are_one_clear_error(capsys):
    assert main(["bench", "decode", "--batch", "0", "--device", "cpu"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert main(["bench", "decode", "--tokens", "500", "--device", "cpu"]) == 2
    assert "exceed the model's max_seq_len" in capsys.readouterr().err
    torch.manual_seed(0)
