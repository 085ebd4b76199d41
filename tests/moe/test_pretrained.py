"""Export and load: safetensors + JSON, no pickle, everything that routes travels along."""

from __future__ import annotations

import json
import re

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
    with pytest.raises(ValueError, match="model.safetensors does not match .*config.json: missing tensors blocks.2"):
        moe.load_pretrained(tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        moe.load_pretrained(tmp_path / "e")


# ------------------------------------------------------------------------------------------------
# A damaged or mismatched export is one UserError naming the file, and `moe eval` exits 2 with one line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    return _trained_model()


@pytest.fixture
def export(tmp_path, trained):
    moe.save_pretrained(trained, tmp_path / "export")
    return tmp_path / "export", trained


def _edit_config(root, change):
    meta = json.loads((root / "config.json").read_text())
    change(meta)
    (root / "config.json").write_text(json.dumps(meta))


def _rewrite_weights(root, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(root / "model.safetensors"))
    change(state)
    save_file(state, str(root / "model.safetensors"), metadata={"format": "slimmoe-v1"})


def _split_weights(root):
    import struct

    raw = (root / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n


def _offsets_past_the_end(root):
    import struct

    raw, n = _split_weights(root)
    header = json.loads(raw[8 : 8 + n])
    entry = header["norm.weight"]
    entry["data_offsets"] = [entry["data_offsets"][0] + 4096, entry["data_offsets"][1] + 4096]
    encoded = json.dumps(header).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def _truncate(where):
    def cut(root):
        raw, n = _split_weights(root)
        at = {"length": 5, "header": 8 + n // 2, "data": 8 + n + (len(raw) - 8 - n) // 2}[where]
        (root / "model.safetensors").write_bytes(raw[:at])
    return cut


def _garbage(root):
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 8)


def _header_longer_than_the_file(root):
    import struct

    raw, _ = _split_weights(root)
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(raw) + 100) + raw[8:])


def _config_text(text):
    def write(root):
        (root / "config.json").write_text(text)
    return write


def _config(change):
    return lambda root: _edit_config(root, change)


def _weights(change):
    return lambda root: _rewrite_weights(root, change)


# (damage, file named, regex the message must match)
DAMAGE = {
    "truncated in the length": (_truncate("length"), "model.safetensors", "truncated"),
    "truncated in the header": (_truncate("header"), "model.safetensors", "truncated"),
    "truncated in the data": (_truncate("data"), "model.safetensors", "truncated"),
    "garbage": (_garbage, "model.safetensors", "not a safetensors file"),
    "header longer than the file": (_header_longer_than_the_file, "model.safetensors", "truncated"),
    "offsets past the end": (_offsets_past_the_end, "model.safetensors", "'norm.weight' runs to byte .* past the end"),
    "config not JSON": (_config_text('{"format": "slimmoe-v1",'), "config.json", "not valid JSON: .* at line 1 column 25"),
    "config a list": (_config_text("[]"), "config.json", "must be a JSON object .*not an array"),
    "no model entry": (_config(lambda m: m.pop("model")), "config.json", 'no "model" entry'),
    "model a list": (_config(lambda m: m.update(model=[1, 2])), "config.json", '"model" is a list'),
    "moe a list": (_config(lambda m: m["model"].update(moe=[])), "config.json", '"model.moe" is a list'),
    "num_layers four": (_config(lambda m: m["model"].update(num_layers="four")), "config.json",
                        "num_layers='four' is invalid"),
    "no format": (_config(lambda m: m.pop("format")), "config.json", 'no "format" entry'),
    "active_experts too short": (_config(lambda m: m.update(active_experts=[2])), "config.json",
                                 "active_experts.* one k per MoE layer \\(2 layers\\)"),
    "active_experts not ints": (_config(lambda m: m.update(active_experts=["2", 2])), "config.json", "active_experts"),
    "num_experts changed": (_config(lambda m: m["model"]["moe"].update(num_experts=8)), "config.json",
                            "model.safetensors does not match .*config.json: blocks.0.ffn.router.weight has shape "
                            "\\(4, 8\\) in the weights and \\(8, 8\\) in the config$"),
    "ffn width changed": (_config(lambda m: m["model"]["moe"].update(ffn_hidden_size=6)), "config.json",
                          "blocks.0.ffn.experts.w1 has shape \\(4, 8, 4\\) in the weights and \\(4, 8, 6\\) in the "
                          "config$"),
    "num_layers changed": (_config(lambda m: m["model"].update(num_layers=3)), "config.json",
                           "does not match .*: missing tensors blocks.2.attn_norm.weight, .* and \\d+ more$"),
    "extra tensor": (_weights(lambda s: s.update(extra=torch.zeros(2))), "model.safetensors",
                     "does not match .*config.json: unexpected tensors extra$"),
    "missing tensor": (_weights(lambda s: s.pop("norm.weight")), "model.safetensors",
                       "does not match .*config.json: missing tensors norm.weight$"),
    "tie_embeddings changed": (_config(lambda m: m["model"].update(tie_embeddings=False)), "config.json",
                               "missing tensors lm_head.weight$"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_export_is_one_user_error_naming_the_file(export, case):
    from moe.errors import UserError

    root, _ = export
    damage, named, pattern = DAMAGE[case]
    damage(root)
    with pytest.raises(UserError) as info:
        moe.load_pretrained(root, device="cpu")
    message = str(info.value)
    assert str(root / named) in message and "\n" not in message, message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("case", ["truncated in the data", "garbage", "config a list", "no model entry",
                                  "num_layers four", "moe a list", "num_experts changed", "missing tensor"])
def test_moe_eval_of_a_damaged_export_exits_2_with_one_line(export, case, capsys):
    from launch.cli import main

    root, _ = export
    damage, named, pattern = DAMAGE[case]
    damage(root)
    capsys.readouterr()
    assert main(["eval", "--model", str(root), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("moe eval: error: "), err
    assert str(root / named) in err and re.search(pattern, err), err


def test_a_valid_export_still_loads_with_identical_logits(export):
    root, model = export
    loaded = moe.load_pretrained(root, device="cpu")
    ids = torch.randint(0, 32, (2, 10))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert [layer.active_experts for _, layer in moe.moe_layers(loaded)] == [2, 2]


def _quantized_export(root):
    """``_trained_model`` with its attention and expert weights RTN-quantized, stored as ``moe quantize`` does."""
    from moe.pretrained import write_export
    from moe.quant import QuantSpec, rtn
    from moe.quant.storage import QUANT_FORMAT, quantized_state

    model = _trained_model()
    spec = QuantSpec(bits=4, group_size=4)
    solved = {}
    for name, weight in model.state_dict().items():
        if name.endswith("attn.qkv.weight"):
            solved[name] = rtn(weight, spec)
        elif ".experts.w" in name:  # [E, in, out]: each expert as the linear [out, in]
            solved[name] = [rtn(w.T.contiguous(), spec) for w in weight]
    state, entries = quantized_state(model.state_dict(), solved)
    quantization = {"format": QUANT_FORMAT, "method": "rtn", "spec": spec.to_dict(), "tensors": entries}
    write_export(model, state, root, {"quantization": quantization})
    return model, solved


def test_a_quantized_export_loads_and_its_damage_names_the_file(tmp_path):
    from moe.errors import UserError

    root = tmp_path / "q"
    model, solved = _quantized_export(root)
    loaded = moe.load_pretrained(root, device="cpu")
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, solved["blocks.0.attn.qkv.weight"].dequantize())
    assert torch.equal(loaded.blocks[1].ffn.experts.w2[3], solved["blocks.1.ffn.experts.w2"][3].dequantize().T)
    assert loaded.quantization["method"] == "rtn"
    config, weights = str(root / "config.json"), str(root / "model.safetensors")
    original = json.loads((root / "config.json").read_text())
    cases = [  # (change to config.json, file named, text)
        (lambda m: m["quantization"]["spec"].update(bits="x"), config, "quantization.spec: QuantSpec.bits='x'"),
        (lambda m: m["quantization"].update(spec=[4]), config, "quantization.spec must be a mapping"),
        (lambda m: m["quantization"].update(format="q9"), config, "quantization format 'q9'"),
        (lambda m: m["quantization"].update(tensors=[]), config, "quantization.tensors must be a mapping"),
        (lambda m: m["quantization"]["tensors"]["blocks.0.attn.qkv.weight"].update(in_features="8"), config,
         "quantization.tensors['blocks.0.attn.qkv.weight'].in_features='8' is invalid"),
        (lambda m: m["quantization"]["tensors"]["blocks.0.attn.qkv.weight"].update(in_features=16), weights,
         "blocks.0.attn.qkv.weight.qweight is torch.uint8 (24, 4); the quantization entry of "
         f"'blocks.0.attn.qkv.weight' in {config} needs uint8 (24, 8)"),
        (lambda m: m["quantization"]["tensors"]["blocks.1.ffn.experts.w1"].update(experts=2), weights,
         "blocks.1.ffn.experts.w1.qweight is torch.uint8 (4, 4, 4)"),
        (lambda m: m["model"]["moe"].update(num_experts=8), weights,
         "blocks.0.ffn.router.weight has shape (4, 8) in the weights and (8, 8) in the config"),
    ]
    for change, named, text in cases:
        meta = json.loads(json.dumps(original))
        change(meta)
        (root / "config.json").write_text(json.dumps(meta))
        with pytest.raises(UserError) as info:
            moe.load_pretrained(root, device="cpu")
        assert str(info.value).startswith(f"{named}: ") or str(info.value).startswith(f"{named} does not match"), info.value
        assert text in str(info.value), info.value
