"""Export and load: safetensors + JSON, no pickle, everything that routes travels along."""

from __future__ import annotations

import json

import pytest
import torch

import moe
from moe import MoEConfig, MoETransformer, ModelConfig


def _trained_model(tie=True):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, num_layers=2, num_heads=2, max_seq_len=16, tie_embeddings=tie,
                      moe=MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, router="random",
                                    balance="bias", router_seed=7))
    model = MoETransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, 32, (2, 9))
        model(ids[:, :-1], labels=ids[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
        moe.update_expert_biases(model)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_outputs_and_routing_state(tmp_path, tie):
    model = _trained_model(tie)
    moe.save_pretrained(model, tmp_path / "export", metadata={"step": 3})
    loaded = moe.load_pretrained(tmp_path / "export")
    ids = torch.randint(0, 32, (3, 12))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    for a, b in zip(model.blocks, loaded.blocks):
        assert torch.equal(a.ffn.router.weight, b.ffn.router.weight)
        assert torch.equal(a.ffn.router.expert_bias, b.ffn.router.expert_bias)
        assert a.ffn.router.expert_bias.abs().sum() > 0
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["step"] == 3 and meta["model"]["moe"]["router_seed"] == 7
    assert not loaded.training


def test_not_an_export_and_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="is not an exported model"):
        moe.load_pretrained(tmp_path)
    model = _trained_model()
    moe.save_pretrained(model, tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "config.json").read_text())
    meta["model"]["num_layers"] = 3
    (tmp_path / "e" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its config"):
        moe.load_pretrained(tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        moe.load_pretrained(tmp_path / "e")
