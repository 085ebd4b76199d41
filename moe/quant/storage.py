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

With EoRA (:mod:`moe.quant.eora`) a parameter also stores its rank-r correction, float16:
``P.eora_a [(E,) r, in]`` and ``P.eora_b [(E,) out, r]`` (per expert for stacked tensors), and its
entry says ``eora_rank``. Loading folds the correction into the weight once:
``W = scale * (code - zero) + eora_b @ eora_a``, so the model's forward is the ordinary dense one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from moe.errors import UserError
from moe.quant.eora import LowRankCorrection
from moe.quant.pack import pack_codes, packed_size, unpack_codes
from moe.quant.quantizer import QuantizedWeight, QuantSpec

QUANT_FORMAT = "slimmoe-q1"


def quantized_tensors(param: str, parts: list[QuantizedWeight], experts: bool) -> dict[str, torch.Tensor]:
    """The three stored tensors of parameter ``param`` (one part per expert when ``experts``)."""
    spec = parts[0].spec
    codes = torch.stack([p.codes for p in parts]) if experts else parts[0].codes  # [(E,) out, in]
    scales = torch.stack([p.scales for p in parts]) if experts else parts[0].scales  # [(E,) out, G]
    zeros = torch.stack([p.zeros for p in parts]) if experts else parts[0].zeros
    tensors = {
        f"{param}.qweight": pack_codes(codes.to(torch.uint8), spec.bits).contiguous(),
        f"{param}.scales": scales.float().contiguous(),
        f"{param}.zeros": zeros.round().to(torch.uint8).contiguous(),
    }
    corrections = [p.eora for p in parts]
    if any(c is not None for c in corrections):
        if any(c is None for c in corrections) or len({c.rank for c in corrections}) != 1:
            raise ValueError(f"{param}: every expert needs an EoRA correction of the same rank, or none")
        for name in ("a", "b"):
            factors = [getattr(c, name) for c in corrections]
            tensors[f"{param}.eora_{name}"] = (torch.stack(factors) if experts else factors[0]).contiguous()
    return tensors


def eora_rank(parts: list[QuantizedWeight]) -> Optional[int]:
    """The rank of the parts' EoRA corrections, or None without."""
    return parts[0].eora.rank if parts[0].eora is not None else None


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
        if eora_rank(parts) is not None:
            entries[param]["eora_rank"] = eora_rank(parts)
    return state, entries


def read_quantization(meta, config: Optional[os.PathLike] = None) -> tuple[QuantSpec, dict]:
    """The spec and the ``tensors`` entries of a ``quantization`` entry ``meta``, checked; a bad
    entry is a :class:`UserError` naming ``config``, the file it was read from."""
    where = f"{config}: " if config is not None else ""
    if not isinstance(meta, Mapping):
        raise UserError(f"{where}quantization must be a mapping, not {type(meta).__name__}")
    if meta.get("format") != QUANT_FORMAT:
        raise UserError(f"{where}quantization format {meta.get('format')!r} is not {QUANT_FORMAT!r}")
    if not isinstance(meta.get("spec"), Mapping):
        raise UserError(f"{where}quantization.spec must be a mapping (bits, group_size, symmetric)")
    try:
        spec = QuantSpec.from_dict(meta["spec"])
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}quantization.spec: {err}") from None
    entries = meta.get("tensors")
    if not isinstance(entries, Mapping):
        raise UserError(f"{where}quantization.tensors must be a mapping of parameter names to entries")
    for param, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise UserError(f"{where}quantization.tensors[{param!r}] must be a mapping")
        for key in ("experts", "out_features", "in_features"):
            value = entry.get(key)
            if not (key == "experts" and value is None) and (type(value) is not int or value < 1):
                allowed = "null or an integer >= 1" if key == "experts" else "an integer >= 1"
                raise UserError(f"{where}quantization.tensors[{param!r}].{key}={value!r} is invalid: expected {allowed}")
        rank = entry.get("eora_rank")
        if rank is not None and (type(rank) is not int or not 1 <= rank <= min(entry["out_features"], entry["in_features"])):
            raise UserError(f"{where}quantization.tensors[{param!r}].eora_rank={rank!r} is invalid: expected an "
                            f"integer in 1..min(out_features, in_features)")
    return spec, dict(entries)


def _check_packed(param: str, parts: tuple, entry: Mapping, spec: QuantSpec, where: str, config: str) -> None:
    """The three stored tensors of ``param`` have the dtypes and shapes its entry says."""
    lead = (entry["experts"],) if entry["experts"] else ()
    out, groups = entry["out_features"], spec.num_groups(entry["in_features"])
    wanted = {"qweight": (lead + (out, packed_size(entry["in_features"], spec.bits)), "uint8"),
              "scales": (lead + (out, groups), "floating point"), "zeros": (lead + (out, groups), "integer or floating point")}
    for part, tensor in zip(("qweight", "scales", "zeros"), parts):
        shape, kind = wanted[part]
        ok_dtype = {"uint8": tensor.dtype == torch.uint8, "floating point": tensor.dtype.is_floating_point,
                    "integer or floating point": not tensor.dtype.is_complex and tensor.dtype != torch.bool}[kind]
        if tuple(tensor.shape) != shape or not ok_dtype:
            raise UserError(f"{where}{param}.{part} is {tensor.dtype} {tuple(tensor.shape)}; the quantization entry "
                            f"of {param!r}{config} needs {kind} {shape} (experts={entry['experts']}, "
                            f"out_features={out}, in_features={entry['in_features']}, bits={spec.bits}, "
                            f"group_size={spec.group_size})")


def _check_eora(param: str, parts: tuple, entry: Mapping, where: str, config: str) -> None:
    """``param``'s EoRA factors have the shapes its entry says (floating point)."""
    lead = (entry["experts"],) if entry["experts"] else ()
    rank = entry["eora_rank"]
    wanted = {"eora_a": lead + (rank, entry["in_features"]), "eora_b": lead + (entry["out_features"], rank)}
    for (part, shape), tensor in zip(wanted.items(), parts):
        if tuple(tensor.shape) != shape or not tensor.dtype.is_floating_point:
            raise UserError(f"{where}{param}.{part} is {tensor.dtype} {tuple(tensor.shape)}; the quantization entry "
                            f"of {param!r}{config} needs floating point {shape} (eora_rank={rank})")


def dequantize_state(state: dict[str, torch.Tensor], meta: Mapping, source: Optional[os.PathLike] = None,
                     config: Optional[os.PathLike] = None) -> dict:
    """``state`` with every quantized parameter turned back into an fp32 weight of its usual shape.

    ``meta`` is the ``quantization`` entry read from ``config``, ``state`` the tensors read from
    ``source``: a bad entry, a missing packed tensor or one whose shape disagrees with its entry is
    a :class:`UserError` naming the file."""
    where = f"{source}: " if source is not None else ""
    spec, entries = read_quantization(meta, config if config is not None else source)
    in_config = f" in {config}" if config is not None else ""
    state = dict(state)
    for param, entry in entries.items():
        try:
            packed, scales, zeros = (state.pop(f"{param}.{part}") for part in ("qweight", "scales", "zeros"))
        except KeyError as err:
            raise UserError(f"{where}quantized parameter {param!r} lacks its {err.args[0]!r} tensor") from None
        _check_packed(param, (packed, scales, zeros), entry, spec, where, in_config)
        codes = unpack_codes(packed, spec.bits, entry["in_features"])  # [(E,) out, in]
        corrections = None
        if entry.get("eora_rank") is not None:
            try:
                factors = tuple(state.pop(f"{param}.{part}") for part in ("eora_a", "eora_b"))
            except KeyError as err:
                raise UserError(f"{where}quantized parameter {param!r} lacks its {err.args[0]!r} tensor") from None
            _check_eora(param, factors, entry, where, in_config)
            if entry["experts"]:
                corrections = [LowRankCorrection(a, b) for a, b in zip(*factors)]
            else:
                corrections = LowRankCorrection(*factors)
        if entry["experts"]:
            parts = [QuantizedWeight(c, s, z.float(), spec, corrections[e] if corrections else None)
                     for e, (c, s, z) in enumerate(zip(codes, scales, zeros))]
            weight = torch.stack([part.effective() for part in parts])
            state[param] = weight.transpose(1, 2).contiguous()  # [E, in, out], as the experts hold it
        else:
            state[param] = QuantizedWeight(codes, scales, zeros.float(), spec, corrections).effective()
    return state


def size_on_disk(path: os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
