"""Quantized exports: packed integer weights with their scales and zero points, in safetensors.

A quantized export is an ordinary export (``config.json`` + ``model.safetensors``, see
:mod:`moe.pretrained`) in which every quantized parameter ``P`` is replaced by three tensors:

- ``P.qweight``: the integer codes, packed along the input dimension (two 4-bit codes per byte for
  2 to 4 bits, one byte per code for 5 to 8 bits; :mod:`moe.quant.pack`);
- ``P.scales``: fp32 scale per output row and group;
- ``P.zeros``: uint8 zero point per output row and group;

value = scale * (code - zero). A plain linear ``P [out, in]`` stores ``[out, ...]``; a stacked
expert tensor (``w1 [E, d, f]``, used as ``x @ w1[e]``) stores each expert as the linear
``w1[e].T [f, d]``, stacked: ``[E, f, ...]``. ``config.json`` gets a ``quantization`` entry with the
spec, the method and calibration settings, and the list of quantized parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from moe.errors import UserError
from moe.quant.pack import pack_codes, unpack_codes
from moe.quant.quantizer import QuantizedWeight, QuantSpec

QUANT_FORMAT = "slimmoe-q1"


def quantized_tensors(param: str, parts: list[QuantizedWeight], experts: bool) -> dict[str, torch.Tensor]:
    """The three stored tensors of parameter ``param`` (one part per expert when ``experts``)."""
    spec = parts[0].spec
    codes = torch.stack([p.codes for p in parts]) if experts else parts[0].codes  # [(E,) out, in]
    scales = torch.stack([p.scales for p in parts]) if experts else parts[0].scales  # [(E,) out, G]
    zeros = torch.stack([p.zeros for p in parts]) if experts else parts[0].zeros
    return {
        f"{param}.qweight": pack_codes(codes.to(torch.uint8), spec.bits).contiguous(),
        f"{param}.scales": scales.float().contiguous(),
        f"{param}.zeros": zeros.round().to(torch.uint8).contiguous(),
    }


def quantized_state(
    model_state: Mapping[str, torch.Tensor], solved: Mapping[str, QuantizedWeight | list[QuantizedWeight]]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to store and the ``tensors`` entry of the metadata: ``solved`` maps a parameter
    name to its :class:`QuantizedWeight` (a list, one per expert, for stacked expert tensors)."""
    state = {name: t.detach().cpu().contiguous() for name, t in model_state.items() if name not in solved}
    entries = {}
    for param, result in solved.items():
        experts = isinstance(result, list)
        parts = result if experts else [result]
        state.update(quantized_tensors(param, parts, experts))
        out_features, in_features = parts[0].shape
        entries[param] = {"experts": len(parts) if experts else None, "out_features": out_features,
                          "in_features": in_features}
    return state, entries


def dequantize_state(state: dict[str, torch.Tensor], meta: Mapping, source: Optional[os.PathLike] = None) -> dict:
    """``state`` with every quantized parameter turned back into an fp32 weight of its usual shape."""
    where = f"{source}: " if source is not None else ""
    if meta.get("format") != QUANT_FORMAT:
        raise UserError(f"{where}quantization format {meta.get('format')!r} is not {QUANT_FORMAT!r}")
    spec = QuantSpec.from_dict(meta["spec"])
    state = dict(state)
    for param, entry in meta["tensors"].items():
        try:
            packed, scales, zeros = (state.pop(f"{param}.{part}") for part in ("qweight", "scales", "zeros"))
        except KeyError as err:
            raise UserError(f"{where}quantized parameter {param!r} lacks its {err.args[0]!r} tensor") from None
        codes = unpack_codes(packed, spec.bits, entry["in_features"])  # [(E,) out, in]
        if entry["experts"]:
            weight = torch.stack([QuantizedWeight(c, s, z.float(), spec).dequantize() for c, s, z in zip(codes, scales, zeros)])
            state[param] = weight.transpose(1, 2).contiguous()  # [E, in, out], as the experts hold it
        else:
            state[param] = QuantizedWeight(codes, scales, zeros.float(), spec).dequantize()
    return state


def size_on_disk(path: os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
