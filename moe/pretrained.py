"""Exported models: ``model.safetensors`` (weights and persistent buffers) beside ``config.json``.

Loading never unpickles anything: the config is JSON and the tensors are safetensors. The fixed
random routers and the expert biases are persistent buffers, so they travel with the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe.devices import resolve_device
from moe.errors import UserError
from moe.metrics import moe_layers
from moe.model import ModelConfig, MoETransformer
from moe.runtime import set_active_experts

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "slimmoe-v1"


def save_pretrained(model: MoETransformer, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (each to a temporary name, then
    renamed, so an interrupted export never leaves a half-written file under the final name).

    The config records each MoE layer's current k as ``active_experts``; :func:`load_pretrained`
    restores it (``moe.set_active_experts`` changes it at any time)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return write_export(model, state, path, metadata)


def write_export(model: MoETransformer, state: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """The files of :func:`save_pretrained` for ``model``'s config with the tensors ``state``
    (``moe.quant`` stores packed weights this way)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight
    weights_tmp, config_tmp = out / (WEIGHTS_NAME + ".tmp"), out / (CONFIG_NAME + ".tmp")
    save_file(state, str(weights_tmp), metadata={"format": FORMAT})
    active = [layer.active_experts for _, layer in moe_layers(model)]
    meta = {"format": FORMAT, "model": model.config.to_dict(), "active_experts": active, **(metadata or {})}
    config_tmp.write_text(json.dumps(meta, indent=2))
    os.replace(weights_tmp, out / WEIGHTS_NAME)
    os.replace(config_tmp, out / CONFIG_NAME)
    return out


def load_pretrained(path: str | os.PathLike, device: str | torch.device | None = None) -> MoETransformer:
    """The model exported at ``path`` in eval mode, on ``device`` (default: the GPU when there is
    one, else the CPU; see :func:`moe.devices.resolve_device`); a path that is not an export is a
    :class:`~moe.errors.UserError`.

    A quantized export (``moe quantize``) loads the same way: its packed weights are dequantized
    into an ordinary model, whose ``quantization`` attribute holds the settings it was made with."""
    root = Path(path)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{str(root)!r} is not an exported model: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{config_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    model = MoETransformer(ModelConfig.from_dict(meta["model"]))
    state = load_file(str(weights_path), device="cpu")
    if meta.get("quantization"):  # packed integer weights: dequantized here, once
        from moe.quant.storage import dequantize_state

        state = dequantize_state(state, meta["quantization"], weights_path)
        model.quantization = meta["quantization"]
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights_path}: does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if meta.get("active_experts"):
        set_active_experts(model, list(meta["active_experts"]))
    return model.to(resolve_device(device)).eval()
