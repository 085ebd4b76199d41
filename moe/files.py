"""Readers of the files the project reads (JSON configs, safetensors weights), with one clear error.

Each reader raises one :class:`~moe.errors.UserError` naming the file and what is wrong with it (a
missing or unreadable file, invalid JSON, a truncated or corrupted safetensors file) instead of the
traceback of ``json`` or ``safetensors``. Nothing else changes: what is not a problem of the file
(``MemoryError``, a bad ``device``) propagates unchanged.

A safetensors file is checked before ``safetensors`` reads it:

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section: file size - 8 - N bytes]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
into the data section) and may hold ``"__metadata__"``, a mapping of strings to strings. The
tensors must cover the data section exactly, each ``numel * dtype size`` bytes long.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import torch

from moe.errors import UserError

MAX_HEADER_BYTES = 100_000_000
"""The largest header ``safetensors`` accepts; a longer one means the file is not safetensors."""

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
"""Bytes per element of each safetensors dtype this project loads."""

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _open_error(path: os.PathLike | str, err: OSError, what: str) -> UserError:
    if isinstance(err, FileNotFoundError):
        return UserError(f"{path}: no such file (expected the {what})")
    if isinstance(err, IsADirectoryError):
        return UserError(f"{path}: is a directory, not the {what}")
    return UserError(f"{path}: cannot read the {what}: {err.strerror or err}")


def read_json(path: os.PathLike | str, what: str = "JSON file") -> dict:
    """The JSON object in ``path``; ``what`` names the file in messages ("model config").

    A missing or unreadable file, text that is not JSON (the message gives line and column) or a
    top level that is not an object is a :class:`UserError` naming ``path``."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as err:
        raise _open_error(path, err, what) from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: the {what} is not valid JSON: {err.msg} at line {err.lineno} "
                        f"column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: the {what} is not UTF-8 text (bad byte at offset {err.start})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: the {what} must be a JSON object ({{...}}), not {_json_type(value)}")
    return value


def read_safetensors_header(path: os.PathLike | str) -> dict:
    """The checked JSON header of the safetensors file ``path``: ``{name: {"dtype", "shape",
    "data_offsets"}}``, plus ``"__metadata__"`` when the file has one. Reads only the header.

    Any problem of the file (missing, truncated, a corrupted header, a tensor outside the data or
    of an unknown dtype) is a :class:`UserError` naming ``path``."""
    what = "safetensors file"
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8:
                raise UserError(f"{path}: truncated: {size} bytes, fewer than the 8 bytes that give a "
                                f"safetensors file's header length")
            (header_len,) = struct.unpack("<Q", file.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise UserError(f"{path}: not a safetensors file, or corrupted: its first 8 bytes give a header "
                                f"length of {header_len} bytes (at most {MAX_HEADER_BYTES})")
            if header_len > size - 8:
                raise UserError(f"{path}: truncated: its header should be {header_len} bytes but only "
                                f"{size - 8} bytes follow the header length ({size} bytes in all)")
            raw = file.read(header_len)
    except OSError as err:
        raise _open_error(path, err, what) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: corrupted: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupted: the safetensors header is {_json_type(header)}, not an object")
    _check_entries(path, header, data_bytes=size - 8 - header_len)
    return header


def _check_entries(path: os.PathLike | str, header: dict, data_bytes: int) -> None:
    """Every tensor entry well formed and the tensors covering the ``data_bytes`` exactly."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupted: the safetensors __metadata__ must map names to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise UserError(f"{path}: corrupted: the header entry of tensor {name!r} is {_json_type(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise UserError(f"{path}: corrupted: tensor {name!r} has dtype {dtype!r}, not a dtype name")
        if dtype not in DTYPE_BYTES:
            raise UserError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} "
                            f"(known: {', '.join(DTYPE_BYTES)})")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise UserError(f"{path}: corrupted: tensor {name!r} has shape {shape!r}, not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{path}: corrupted: tensor {name!r} has data_offsets {offsets!r}, "
                            f"not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        needed = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != needed:
            raise UserError(f"{path}: corrupted: tensor {name!r} ({dtype} {tuple(shape)}) takes {needed} bytes "
                            f"but its data_offsets [{begin}, {end}] span {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for begin, end, name in spans:
        if end > data_bytes:
            raise UserError(f"{path}: truncated (or corrupted): tensor {name!r} runs to byte {end} of the data, "
                            f"past the end of the {data_bytes} bytes the file holds")
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise UserError(f"{path}: corrupted: tensor {name!r} starts at byte {begin} of the data, where "
                            f"{'the previous tensor overlaps it' if begin < position else 'a gap precedes it'} "
                            f"(expected {position})")
        position = end
    if position != data_bytes:
        raise UserError(f"{path}: corrupted: {data_bytes - position} bytes after the last tensor's data")


def read_safetensors_metadata(path: os.PathLike | str) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file ``path`` ({} when it has none), after the checks
    of :func:`read_safetensors_header`."""
    return dict(read_safetensors_header(path).get("__metadata__", {}))


def load_safetensors(path: os.PathLike | str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, on ``device``. The file is checked first (see
    :func:`read_safetensors_header`); an error ``safetensors`` still finds is a :class:`UserError`
    naming ``path`` too."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path), device=device if isinstance(device, str) else str(device))
    except SafetensorError as err:
        detail = " ".join(str(err).split()) or type(err).__name__  # one line
        raise UserError(f"{path}: not a valid safetensors file: {detail}") from None
    except OSError as err:  # removed or made unreadable since the check
        raise _open_error(path, err, "safetensors file") from None
