"""Exported models: ``model.safetensors`` (weights and persistent buffers) beside ``config.json``.

Loading never unpickles anything: the config is JSON and the tensors are safetensors. The fixed
random routers and the expert biases are persistent buffers, so they travel with the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from moe.devices import resolve_device
from moe.errors import UserError
from moe.files import load_safetensors, read_json
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
    one, else the CPU; see :func:`moe.devices.resolve_device`).

    A quantized export (``moe quantize``) loads the same way: its packed weights are dequantized
    into an ordinary model, whose ``quantization`` attribute holds the settings it was made with.
    EoRA factors stored with a weight (``--eora``) are folded in here, once: the weight becomes
    ``dequant(Wq) + B @ A`` (:func:`moe.quant.storage.dequantize_state`), so the forward needs no
    extra matmul and computes exactly the corrected layer ``x (Wq + B A)^T``.

    Every problem of the export is one :class:`~moe.errors.UserError` naming the file: a path that
    is not an export, a truncated or corrupted ``model.safetensors``, a ``config.json`` that is not
    JSON or not of the expected structure, and weights whose names or shapes disagree with the
    model ``config.json`` describes (checked before anything is copied into the model)."""
    root = Path(path)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{str(root)!r} is not an exported model: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it")
    meta = read_json(config_path, what="exported model's config")
    if "format" not in meta:
        raise UserError(f"{config_path}: no \"format\" entry; an export's config has \"format\": {FORMAT!r}")
    if meta["format"] != FORMAT:
        raise UserError(f"{config_path}: format {meta['format']!r} is not {FORMAT!r}")
    config = _model_config(meta, config_path)
    state = load_safetensors(weights_path, device="cpu")
    quantization = meta.get("quantization")
    if quantization:  # packed integer weights: dequantized here, once
        from moe.quant.storage import dequantize_state

        state = dequantize_state(state, quantization, weights_path, config=config_path)
    check_tensors(state, config, weights_path, config_path)
    active = _active_experts(meta, config, config_path)
    model = MoETransformer(config)
    if quantization:
        model.quantization = quantization
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)  # names and shapes checked above
    if active is not None:
        set_active_experts(model, active)
    return model.to(resolve_device(device)).eval()


def _model_config(meta: dict, config_path: Path) -> ModelConfig:
    """The ``model`` entry of an export's config as a :class:`ModelConfig`; a missing entry, one of
    the wrong type or a bad field is a :class:`UserError` naming the file and the field."""
    values = meta.get("model")
    if not isinstance(values, Mapping):
        found = "no \"model\" entry" if values is None else f"\"model\" is a {type(values).__name__}"
        raise UserError(f"{config_path}: {found}; expected a mapping of the model's settings")
    if "moe" in values and not isinstance(values["moe"], Mapping):
        raise UserError(f"{config_path}: \"model.moe\" is a {type(values['moe']).__name__}; expected a mapping "
                        f"of the MoE layer's settings")
    try:
        return ModelConfig.from_dict(values)
    except (ValueError, TypeError) as err:  # ValueError: UserError names the field and the value
        raise UserError(f"{config_path}: \"model\": {err}") from None


def _active_experts(meta: dict, config: ModelConfig, config_path: Path) -> list[int] | None:
    """The ``active_experts`` entry, one k per MoE layer in 1..num_experts; None when absent."""
    active = meta.get("active_experts")
    if active is None:
        return None
    moe_blocks = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    experts = [config.moe_config(i).num_experts for i in moe_blocks]
    if (not isinstance(active, list) or len(active) != len(moe_blocks)
            or not all(type(k) is int and 1 <= k <= e for k, e in zip(active, experts))):
        limit = f"1..{experts[0]}" if len(set(experts)) == 1 else f"1..E of its layer (E = {experts})"
        raise UserError(f"{config_path}: \"active_experts\"={active!r} is invalid: expected a list of one k per "
                        f"MoE layer ({len(moe_blocks)} layers), each an integer in {limit}")
    return active


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor an export of a model with ``config`` stores (built on the
    meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = MoETransformer(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)  # stored once, as embed.weight
    return shapes


def check_tensors(state: Mapping[str, torch.Tensor], config: ModelConfig, weights: os.PathLike | str,
                  config_path: os.PathLike | str) -> None:
    """A :class:`UserError` in one line when the tensors ``state`` (read from ``weights``) are not
    those of a model with ``config`` (read from ``config_path``): the first tensor whose shape
    differs, and the missing and the unexpected tensor names."""
    expected = tensor_shapes(config)
    problems = []
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != shape:
            found = tuple(state[name].shape)
            problems.append(f"{name} has shape {found} in the weights and {shape} in the config")
            break
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        names = [f"missing tensors {_names(missing)}"] if missing else []
        names += [f"unexpected tensors {_names(unexpected)}"] if unexpected else []
        problems.append("; ".join(names))
    if problems:
        raise UserError(f"{weights} does not match {config_path}: {'; '.join(problems)}")


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
