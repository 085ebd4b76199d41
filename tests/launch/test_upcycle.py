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


def test_moe_train_init_starts_from_the_export_with_its_model_section(tmp_path, cache):
    """`moe train --init` on the upcycled export: the run's model is the export's (with a --set on
    top), and one step at a negligible learning rate leaves the export's weights in place."""
    import yaml
    from safetensors.torch import load_file

    from launch.export import export_checkpoint

    _dense_export(tmp_path / "dense")
    assert main(["upcycle", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--experts", "4"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.yaml", "--init", str(tmp_path / "moe"), "--nproc", "1",
                 "--set", f"out_dir={run}", "--set", f"data.cache_dir={cache}", "--set", "train.steps=1",
                 "--set", "train.lr=1e-12", "--set", "train.warmup_steps=0", "--set", "train.eval_every=0",
                 "--set", "train.weight_decay=0", "--set", "train.seq_len=32", "--set", "model.moe.top_k=2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["moe"]["num_experts"] == 4 and saved["model"]["moe"]["hidden_size"] == 16
    assert saved["model"]["moe"]["top_k"] == 2  # the --set on top of the export's model section
    assert saved["train"]["init"] == str((tmp_path / "moe").resolve())
    trained = load_file(str(export_checkpoint(str(run / "checkpoints"), str(tmp_path / "after")) / "model.safetensors"))
    start = load_file(str(tmp_path / "moe" / "model.safetensors"))
    for name in ("blocks.0.ffn.experts.w1", "blocks.1.attn.qkv.weight", "embed.weight"):
        torch.testing.assert_close(trained[name], start[name], rtol=0, atol=1e-6, msg=name)


def test_an_init_that_is_not_an_export_is_one_clear_error(tmp_path, capsys):
    assert main(["train", "--config", "configs/tiny.yaml", "--init", str(tmp_path / "nothing"),
                 "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "holds no exported model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
