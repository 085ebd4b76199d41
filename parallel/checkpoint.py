"""DeepSpeed checkpoints that survive being killed, and the weights inside them.

A checkpoint is DeepSpeed's own folder ``<root>/<tag>/`` (model and optimizer states, ZeRO
shards, the trainer's ``client_state``) plus ``run_config.json`` beside those files. It becomes
the one to resume from only when complete: every rank writes, all ranks meet at a barrier, and
rank 0 then points ``<root>/latest`` at the tag by writing a temporary file and renaming it. A run
killed mid-save leaves ``latest`` naming the previous, complete checkpoint. DeepSpeed's
``load_checkpoint`` reads the same ``latest`` file, so its tools (``zero_to_fp32``) work on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

LATEST = "latest"
RUN_CONFIG = "run_config.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
TRAINER_STATE = "trainer"


class CheckpointError(ValueError):
    """A checkpoint the user named is missing, incomplete, or from a different model."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(root: str | os.PathLike) -> Optional[str]:
    """The tag ``root/latest`` names, or None when there is no complete checkpoint in ``root``."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (Path(root) / tag / RUN_CONFIG).is_file() else None


def resolve(path: str | os.PathLike) -> tuple[Path, str]:
    """(root, tag) of a checkpoint named either by its root (the latest one) or by its tag folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / RUN_CONFIG).is_file() and (path / MODEL_STATES).is_file():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise CheckpointError(f"{str(path)!r} holds no complete checkpoint (no '{LATEST}' file naming a finished one)")
    return path, tag


def read_run_config(root: str | os.PathLike, tag: str) -> dict:
    return json.loads((Path(root) / tag / RUN_CONFIG).read_text())


def check_same_model(saved_model: dict, model: dict, where: str) -> None:
    """Raise :class:`CheckpointError` naming the first field where two model configs differ in
    anything that changes the shape of a tensor in the checkpoint."""
    shape_fields = ["vocab_size", "num_layers", "num_heads", "moe_every", "dense_ffn_hidden_size", "tie_embeddings"]
    moe_fields = ["hidden_size", "ffn_hidden_size", "num_experts", "activation", "router", "balance"]
    pairs = [(name, saved_model.get(name), model.get(name)) for name in shape_fields]
    pairs += [(f"moe.{name}", saved_model["moe"].get(name), model["moe"].get(name)) for name in moe_fields]
    for name, saved, wanted in pairs:
        if saved != wanted:
            raise CheckpointError(
                f"{where} is from another model shape: model.{name} is {saved!r} there and {wanted!r} in this config"
            )


def save(engine, root: str | os.PathLike, step: int, trainer_state: dict, run_config: dict, keep: int = 0) -> str:
    """Write the checkpoint of ``step`` on every rank, then publish it as ``latest``; with
    ``keep > 0``, delete all but the ``keep`` newest complete checkpoints. Returns the tag."""
    root, tag = Path(root), tag_for_step(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={TRAINER_STATE: trainer_state}, save_latest=False)
    if dist.get_rank() == 0:
        _write_atomic(root / tag / RUN_CONFIG, json.dumps(run_config, indent=2))
    dist.barrier()  # every rank's files are on disk before the pointer moves
    if dist.get_rank() == 0:
        _write_atomic(root / LATEST, tag)
        if keep > 0:
            _prune(root, keep, protect=tag)
    dist.barrier()
    return tag


def load(engine, root: str | os.PathLike, tag: str) -> dict:
    """Restore model, optimizer, LR schedule and buffers (expert biases included) from
    ``root/tag``; returns the trainer state saved with it."""
    load_path, saved = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag!r} from {str(root)!r}")
    return saved[TRAINER_STATE]


def _model_states(root: str | os.PathLike, tag: str) -> dict:
    return torch.load(Path(root) / tag / MODEL_STATES, map_location="cpu", weights_only=True)


def trainer_state(root: str | os.PathLike, tag: str) -> dict:
    """The trainer's state saved with a checkpoint (step, sampler, k per layer), read without an
    engine. It lives under one key, ``TRAINER_STATE``, beside DeepSpeed's own."""
    return _model_states(root, tag).get(TRAINER_STATE, {})


def model_state_dict(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The full-precision weights and persistent buffers of a checkpoint, without an engine.

    With ZeRO shards present, DeepSpeed's ``zero_to_fp32`` rebuilds the fp32 master weights
    (exact even when training ran in bf16); buffers come from the model states file. The files
    are read with ``weights_only=True``.
    """
    folder = Path(root) / tag
    states = _model_states(root, tag)
    module = {name: tensor for name, tensor in states["module"].items()}
    if any(folder.glob("*optim_states.pt")) and states.get("param_shapes") is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        module.update({name: tensor for name, tensor in fp32.items()})
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in module.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep: int, protect: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and (p / RUN_CONFIG).is_file())
    for old in tags[:-keep]:
        if old != protect:
            shutil.rmtree(root / old, ignore_errors=True)


def model_from_checkpoint(path: str | os.PathLike):
    """(model in eval mode, run config dict, tag) of the checkpoint at ``path`` (a checkpoints
    root, whose latest checkpoint is used, or one tag folder), with each MoE layer at the k it had
    at the checkpoint's last step."""
    from moe import ModelConfig, MoETransformer, set_active_experts

    root, tag = resolve(path)
    run_config = read_run_config(root, tag)
    model = MoETransformer(ModelConfig.from_dict(run_config["model"]))
    model.load_state_dict(model_state_dict(root, tag))
    active = trainer_state(root, tag).get("active_experts")
    if active:
        set_active_experts(model, list(active))
    return model.eval(), run_config, tag
