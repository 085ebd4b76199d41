"""`moe upcycle`: a dense export becomes an MoE export that computes the dense function at init
and records where it came from; `moe train --init` continues from it."""

from __future__ import annotations

import json

import torch

import moe
from launch.cli import main
from moe import ModelConfig, MoEConfig, MoETransformer


def _dense_export(path):
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(num_layers=2, num_heads=2, max_seq_len=32, moe=MoEConfig(
        hidden_size=16, ffn_hidden_size=24, num_experts=1, top_k=1, router="learned"))).eval()
    moe.save_pretrained(model, path, metadata={"data": {"path": None, "cache_dir": "/tmp/cache", "val_permille": 50}})
    return model


def test_the_upcycled_export_computes_the_dense_function_and_records_its_source(tmp_path, capsys):
    dense = _dense_export(tmp_path / "dense")
    assert main(["upcycle", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--experts", "4",
                 "--top-k", "2", "--balance", "bias"]) == 0
    assert "2 MoE layers of 4 experts" in capsys.readouterr().out
    sparse = moe.load_pretrained(tmp_path / "moe", device="cpu")
    assert sparse.config.moe.num_experts == 4 and sparse.config.moe.balance == "bias"
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids), dense(ids), rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert meta["source"]["upcycled_from"] == str((tmp_path / "dense").resolve())
    assert meta["data"]["cache_dir"] == "/tmp/cache"


def test_a_model_that_is_not_dense_or_an_occupied_out_is_one_clear_error(tmp_path, capsys):
    torch.manual_seed(0)
    moe.save_pretrained(MoETransformer(ModelConfig(num_layers=1, num_heads=2, max_seq_len=16, moe=MoEConfig(
        hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2))), tmp_path / "sparse")
    assert main(["upcycle", "--dense", str(tmp_path / "sparse"), "--out", str(tmp_path / "o"), "--experts", "8"]) == 2
    assert "not a dense SwiGLU FFN" in capsys.readouterr().err
    _dense_export(tmp_path / "dense")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "config.json").write_text("{}")
    assert main(["upcycle", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "o2"), "--experts", "2"]) == 2
    assert "already holds an exported model" in capsys.readouterr().err
