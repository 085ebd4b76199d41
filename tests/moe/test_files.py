"""moe.files: every problem of a JSON or safetensors file is one UserError naming the file."""

from __future__ import annotations

import json
import random
import struct

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

from moe.errors import UserError
from moe.files import load_safetensors, read_json, read_safetensors_header, read_safetensors_metadata


def _tensors():
    return {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2, 3], dtype=torch.int64),
            "c": torch.ones(4, dtype=torch.bfloat16)}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "test", "note": "x"})
    return path


def _split(raw: bytes):
    """(header dict, data bytes) of a safetensors file's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _fails(path, *words):
    with pytest.raises(UserError) as info:
        load_safetensors(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    assert any(word in message for word in words), message
    return message


def test_a_valid_file_loads_with_its_metadata(weights):
    loaded = load_safetensors(weights)
    for name, tensor in _tensors().items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    assert read_safetensors_metadata(weights) == {"format": "test", "note": "x"}
    header = read_safetensors_header(weights)
    assert header["a"]["shape"] == [2, 3] and header["c"]["dtype"] == "BF16"


def test_an_empty_file_without_metadata(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    assert load_safetensors(path) == {} and read_safetensors_metadata(path) == {}


def test_every_truncation_is_named_truncated(weights):
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for cut in range(len(raw)):  # inside the 8-byte length, inside the header, inside the data
        weights.write_bytes(raw[:cut])
        _fails(weights, "truncated")
        with pytest.raises(UserError, match="truncated"):
            read_safetensors_metadata(weights)
    weights.write_bytes(raw[: 8 + n + 5])
    assert "past the end" in _fails(weights, "truncated")


def test_garbage_and_absurd_or_too_long_header_lengths(weights):
    raw = weights.read_bytes()
    weights.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(500)))
    _fails(weights, "not a safetensors file")
    weights.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    _fails(weights, "not a safetensors file")
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])  # longer than the file
    _fails(weights, "truncated")


def test_corrupted_headers(weights):
    raw = weights.read_bytes()
    header, data = _split(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    weights.write_bytes(raw[:8] + b"#" * n + data)
    _fails(weights, "not JSON")
    weights.write_bytes(raw[:8] + b"\xff" * n + data)
    _fails(weights, "not JSON")
    weights.write_bytes(_join([1, 2], data))  # type: ignore[arg-type]
    _fails(weights, "not an object")
    for change, word in [
        (lambda h: h["a"].update(dtype="F17"), "unknown dtype 'F17'"),
        (lambda h: h["a"].update(shape=[3, 3]), "takes 36 bytes"),
        (lambda h: h["a"].update(shape="2x3"), "shape"),
        (lambda h: h["a"].update(data_offsets=[5]), "data_offsets"),
        (lambda h: h["a"].pop("data_offsets"), "data_offsets"),
        (lambda h: h.update(a=[1]), "header entry of tensor 'a'"),
        (lambda h: h.update(__metadata__={"n": 1}), "__metadata__"),
    ]:
        changed = json.loads(json.dumps(header))
        change(changed)
        weights.write_bytes(_join(changed, data))
        _fails(weights, word)


def test_offsets_past_the_end_overlaps_gaps_and_trailing_bytes(weights):
    header, data = _split(weights.read_bytes())
    last = max((h for k, h in header.items() if k != "__metadata__"), key=lambda h: h["data_offsets"][1])
    begin, end = last["data_offsets"]
    last["data_offsets"] = [begin + 1000, end + 1000]
    weights.write_bytes(_join(header, data))
    assert "past the end" in _fails(weights, "past the end")
    last["data_offsets"] = [begin - 1, end - 1]  # overlaps the tensor before it
    weights.write_bytes(_join(header, data))
    _fails(weights, "overlaps")
    last["data_offsets"] = [begin, end]
    weights.write_bytes(_join(header, data + b"xyz"))
    _fails(weights, "3 bytes after the last tensor")
    header_copy = json.loads(json.dumps(header))
    for entry in header_copy.values():
        if "data_offsets" in entry:
            entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]
    weights.write_bytes(_join(header_copy, b"\0" * 4 + data))
    _fails(weights, "gap")


def test_any_change_to_a_header_byte_loads_or_is_a_user_error(weights):
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(1)
    for position in range(8 + n):
        changed = bytearray(raw)
        changed[position] = rng.choice([b for b in range(256) if b != raw[position]])
        weights.write_bytes(bytes(changed))
        try:
            load_safetensors(weights)
        except UserError as err:
            assert str(weights) in str(err)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="is a directory"):
        load_safetensors(tmp_path)


def test_errors_of_safetensors_itself_are_named_and_others_propagate(weights, monkeypatch):
    def corrupted(*args, **kwargs):
        raise safetensors.SafetensorError("Error while deserializing header: something new")

    monkeypatch.setattr(safetensors.torch, "load_file", corrupted)
    with pytest.raises(UserError, match=f"{weights}: not a valid safetensors file: .*something new"):
        load_safetensors(weights)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory")

    monkeypatch.setattr(safetensors.torch, "load_file", out_of_memory)
    with pytest.raises(MemoryError):
        load_safetensors(weights)


def test_read_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": [1, 2], "b": {"c": null}}')
    assert read_json(path) == {"a": [1, 2], "b": {"c": None}}
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.json'}: no such file \\(expected the run config\\)"):
        read_json(tmp_path / "missing.json", what="run config")
    with pytest.raises(UserError, match="is a directory"):
        read_json(tmp_path)
    path.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(UserError, match=f"{path}: the JSON file is not valid JSON: .* at line 4 column 1$"):
        read_json(path)
    for text, kind in [("[]", "an array"), ('"x"', "a string"), ("3", "a number"), ("null", "null")]:
        path.write_text(text)
        with pytest.raises(UserError, match=f"{path}: the model config must be a JSON object .*, not {kind}"):
            read_json(path, what="model config")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match="not UTF-8"):
        read_json(path)
