"""DeepSpeed checkpoints that survive being killed, load at any layout, and export without pickle.

A checkpoint is a folder ``<root>/<tag>/`` holding

- DeepSpeed's own files (model states, optimizer states or ZeRO shards, the trainer's state under
  ``client_state["trainer"]``): what a resume at the same layout loads;
- the portable state, safetensors files of consolidated fp32 weights and AdamW moments, replicated
  tensors in ``model.safetensors`` / ``optim.safetensors`` and each slice of experts in
  ``*.experts-FIRST-LAST.safetensors``: what export reads, and what a resume at another world
  size, expert-parallel size or ZeRO stage restores from (DeepSpeed's universal checkpoint does
  not cover MoE);
- ``run_config.json``, the config that wrote it.

It becomes the one to resume from only when complete: every rank writes, all ranks meet at a
barrier, and rank 0 then points ``<root>/latest`` at the tag by writing a temporary file and
renaming it. A run killed mid-save leaves ``latest`` naming the previous, complete checkpoint.
DeepSpeed's ``load_checkpoint`` reads the same ``latest`` file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moe.errors import UserError

LATEST = "latest"
RUN_CONFIG = "run_config.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
TRAINER_STATE = "trainer"


class CheckpointError(UserError):
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


def verify_replicas(model) -> None:
    """Raise if a tensor that every rank holds whole (everything but expert slices: embeddings,
    attention, routers, expert biases) differs between ranks. One all-gather of per-tensor sums."""
    from moe.devices import collective_device
    from parallel.expert_parallel import is_expert_parameter

    if dist.get_world_size() == 1:
        return
    names, sums = [], []
    for name, tensor, is_param in _named_state(model):
        if not (is_param and is_expert_parameter(tensor)):
            names.append(name)
            sums.append(tensor.detach().double().sum().to(collective_device()))
    mine = torch.stack(sums)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for rank, theirs in enumerate(every):
        bad = (theirs != mine).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(f"replicated tensors differ between rank {dist.get_rank()} and rank {rank}: "
                               f"{', '.join(names[i] for i in bad[:5])}")


def save(engine, root: str | os.PathLike, step: int, trainer_state: dict, run_config: dict, keep: int = 0) -> str:
    """Write the checkpoint of ``step`` on every rank, then publish it as ``latest``; with
    ``keep > 0``, delete all but the ``keep`` newest complete checkpoints. Returns the tag."""
    root, tag = Path(root), tag_for_step(step)
    verify_replicas(engine.module)  # rank 0 writes the replicated tensors for everyone
    engine.save_checkpoint(str(root), tag=tag, client_state={TRAINER_STATE: trainer_state}, save_latest=False)
    save_portable(engine, root / tag)
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
    ``root/tag``; returns the trainer state saved with it.

    At the layout that wrote it (world size, expert-parallel size, ZeRO stage) DeepSpeed loads its own
    files; DeepSpeed then gives every rank the model states of rank 0, so each rank's expert slice
    is set again from the portable files. At another layout everything comes from those files
    (:func:`load_resharded`)."""
    saved_layout = trainer_state(root, tag).get("layout")
    if saved_layout is not None and saved_layout != current_layout(engine):
        return load_resharded(engine, root, tag)
    load_path, saved = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag!r} from {str(root)!r}")
    if _expert_range(engine.module) is not None:
        restore_portable(engine, root, tag, optimizer=False)
    return saved[TRAINER_STATE]


def current_layout(engine) -> dict:
    """How this run spreads the model and its optimizer over ranks. DeepSpeed's own files load only
    into the same layout; a checkpoint records it so that a resume elsewhere uses the portable files."""
    span = _expert_range(engine.module)
    ep = 1 if span is None else span[2] // (span[1] - span[0])
    return {"world_size": dist.get_world_size(), "expert_parallel_size": ep,
            "zero_stage": int(engine.zero_optimization_stage())}


def _model_states(root: str | os.PathLike, tag: str) -> dict:
    return torch.load(Path(root) / tag / MODEL_STATES, map_location="cpu", weights_only=True)


def trainer_state(root: str | os.PathLike, tag: str) -> dict:
    """The trainer's state saved with a checkpoint (step, sampler, k per layer), read without an
    engine. It lives under one key, ``TRAINER_STATE``, beside DeepSpeed's own."""
    return _model_states(root, tag).get(TRAINER_STATE, {})


def model_state_dict(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights and persistent buffers of a checkpoint, whatever the
    expert-parallel size it was written at (read from its safetensors files; no engine, no pickle)."""
    return _read_portable(Path(root) / tag, "model")


def optimizer_state_dict(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """Consolidated AdamW moments, ``{name}.exp_avg`` and ``{name}.exp_avg_sq`` for every parameter."""
    return _read_portable(Path(root) / tag, "optim")


# ----------------------------------------------------------------------------- portable state
#
# Beside DeepSpeed's own files, every checkpoint holds the full-precision weights and AdamW
# moments in safetensors files that do not depend on how the model was spread over ranks:
#
#   model.safetensors, optim.safetensors              replicated tensors (rank 0 writes)
#   model.experts-00004-00008.safetensors, optim...   experts [4, 8) of every MoE layer (written by
#                                                     the first rank of the group that holds them)
#
# DeepSpeed's checkpoints resume only at the expert-parallel size and world size that wrote them
# (its universal checkpoint does not cover MoE); these files are what export reads and what a
# resume at another size restores from.


def _expert_range(model) -> Optional[tuple[int, int, int]]:
    """(first, last, num_experts) of this rank's experts, or None when experts are not sharded."""
    from moe.metrics import moe_layers

    for _, layer in moe_layers(model):
        first_last = getattr(layer, "expert_range", None)
        if first_last is not None:
            return (*first_last, layer.num_experts)
    return None


def _is_expert_writer(model) -> bool:
    from moe.metrics import moe_layers

    for _, layer in moe_layers(model):
        groups = getattr(layer.dispatcher, "groups", None)
        if groups is not None:
            return dist.get_rank(group=groups.data_parallel_group) == 0
    return False


def _named_state(model):
    """(name, tensor, is parameter) for every parameter and persistent buffer, each tensor once."""
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # a tied weight appears under two names
        seen.add(id(tensor))
        yield name, tensor, isinstance(tensor, torch.nn.Parameter)


MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero(engine):
    """DeepSpeed's ZeRO-1/2 optimizer, or None for the plain per-parameter one (ZeRO-0, fp32)."""
    return engine.optimizer if hasattr(engine.optimizer, "single_partition_of_fp32_groups") else None


def _moments(engine, param) -> dict[str, torch.Tensor]:
    """The full AdamW moments of ``param`` (zeros before the first step). Under ZeRO each rank holds
    a fragment of the flat fp32 partition; the fragments are summed over the parameter's group, as
    DeepSpeed's own ``get_full_hp_param`` does (which cannot be used: DeepSpeed links the optimizer
    state of only the first parameter group to the fragments)."""
    from moe.devices import collective_device

    zero = _zero(engine)
    if zero is None:
        state = engine.optimizer.state.get(param, {})
        return {key: state[key] if key in state else torch.zeros_like(param, dtype=torch.float32) for key in MOMENTS}
    mapping = param._hp_mapping
    out = {}
    for key in MOMENTS:
        full = torch.zeros(param.numel(), dtype=torch.float32, device=collective_device(param._dp_group))
        if mapping is not None:
            flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
            state = zero.optimizer.state.get(flat, {})
            if key in state:
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                full.narrow(0, lp.start, lp.numel).copy_(state[key].narrow(0, hp.start, hp.numel))
        dist.all_reduce(full, group=param._dp_group)
        out[key] = full.view_as(param)
    return out


def _set_moments(engine, param, values: dict[str, torch.Tensor], steps: int) -> None:
    """Put full moments into the optimizer state of ``param`` (this rank's fragment under ZeRO)."""
    zero = _zero(engine)
    if zero is None:
        engine.optimizer.state[param] = {"step": _step_tensor(engine.optimizer, param, steps),
                                         **{key: values[key].to(param.device).clone() for key in MOMENTS}}
        return
    mapping = param._hp_mapping
    if mapping is None:
        return
    flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
    state = zero.optimizer.state.setdefault(flat, {})
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    for key in MOMENTS:
        if key not in state:
            state[key] = torch.zeros_like(flat)
        state[key].narrow(0, hp.start, hp.numel).copy_(values[key].flatten().narrow(0, lp.start, lp.numel))
    state["step"] = _step_tensor(zero.optimizer, flat, steps)
    zero._hp_optimizer_states_linked = False  # DeepSpeed relinks its fragment views after the next step


def _step_tensor(optimizer, param: torch.Tensor, steps: int) -> torch.Tensor:
    """AdamW's ``step`` as torch keeps it: on the parameter's device for the fused (and capturable)
    implementation, which reads it on the GPU, on the CPU otherwise."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(steps), dtype=torch.float32, device=param.device if on_device else "cpu")


def save_portable(engine, folder: Path) -> None:
    """Write this checkpoint's portable weights and moments (every rank calls: gathering ZeRO
    shards is collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from parallel.expert_parallel import is_expert_parameter

    model = engine.module
    replicated = {"model": {}, "optim": {}}
    experts = {"model": {}, "optim": {}}
    for name, tensor, is_param in _named_state(model):
        target = experts if is_param and is_expert_parameter(tensor) else replicated
        if not is_param:
            target["model"][name] = tensor.detach()
            continue
        full = safe_get_full_fp32_param(tensor)
        target["model"][name] = (tensor.detach() if full is None else full).float()
        for key, moment in _moments(engine, tensor).items():
            target["optim"][f"{name}.{key}"] = moment.float()
    span = _expert_range(model)
    if dist.get_rank() == 0:
        for kind, tensors in replicated.items():
            _save_tensors(folder / f"{kind}.safetensors", tensors, {})
    if span is not None and _is_expert_writer(model):
        first, last, total = span
        meta = {"first_expert": str(first), "last_expert": str(last), "num_experts": str(total)}
        for kind, tensors in experts.items():
            _save_tensors(folder / f"{kind}.experts-{first:05d}-{last:05d}.safetensors", tensors, meta)


def _save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_portable(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    replicated = folder / f"{kind}.safetensors"
    if not replicated.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {replicated.name} (not written by this trainer?)")
    state = load_file(str(replicated))
    shards = sorted(folder.glob(f"{kind}.experts-*.safetensors"))
    if not shards:
        return state
    pieces: dict[str, list] = {}
    expected_first, total = 0, None
    for shard in shards:  # names sort by first expert
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            first, last, total = int(meta["first_expert"]), int(meta["last_expert"]), int(meta["num_experts"])
            if first != expected_first:
                raise CheckpointError(f"checkpoint {str(folder)!r} lacks experts {expected_first}..{first - 1} ({kind})")
            for key in f.keys():
                pieces.setdefault(key, []).append(f.get_tensor(key))
        expected_first = last
    if expected_first != total:
        raise CheckpointError(f"checkpoint {str(folder)!r} lacks experts {expected_first}..{total - 1} ({kind})")
    state.update({key: torch.cat(parts) for key, parts in pieces.items()})
    return state


def restore_portable(engine, root: str | os.PathLike, tag: str, optimizer: bool = True) -> None:
    """Set this rank's weights (its slice of the experts included) and, with ``optimizer``, its
    AdamW moments and step from a checkpoint's portable files, whatever layout wrote them."""
    from deepspeed.utils import safe_set_full_fp32_param

    from parallel.expert_parallel import is_expert_parameter

    folder = Path(root) / tag
    model = engine.module
    weights = model_state_dict(root, tag)
    moments = optimizer_state_dict(root, tag) if optimizer else {}
    span = _expert_range(model)
    steps = int(trainer_state(root, tag)["step"])
    for name, tensor, is_param in _named_state(model):
        if name not in weights:
            raise CheckpointError(f"checkpoint {str(folder)!r} has no tensor {name!r}")
        sharded = is_param and is_expert_parameter(tensor) and span is not None
        local = (lambda full: full[span[0]:span[1]]) if sharded else (lambda full: full)
        value = local(weights[name])
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: shape {tuple(value.shape)} in the checkpoint, {tuple(tensor.shape)} here")
        with torch.no_grad():
            tensor.copy_(value.to(tensor.dtype))
        if not is_param:
            continue
        safe_set_full_fp32_param(tensor, value.to(tensor.device))
        if optimizer:
            _set_moments(engine, tensor, {key: local(moments[f"{name}.{key}"]) for key in MOMENTS}, steps)


def load_resharded(engine, root: str | os.PathLike, tag: str) -> dict:
    """Resume from a checkpoint written at another expert-parallel size or world size: weights,
    AdamW moments and step from the portable files, the LR schedule and DeepSpeed's counters from
    the model states file. Returns the trainer state."""
    states = _model_states(root, tag)
    restore_portable(engine, root, tag, optimizer=True)
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
        # the optimizer's groups still hold the LR of step -1; put the restored step's LR in them
        engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
    engine.global_steps = int(states.get("global_steps", 0))
    engine.global_samples = int(states.get("global_samples", 0))
    engine.skipped_steps = int(states.get("skipped_steps", 0))
    return states[TRAINER_STATE]


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
    state = model_state_dict(root, tag)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]  # one tensor, saved once
    model.load_state_dict(state)
    active = trainer_state(root, tag).get("active_experts")
    if active:
        set_active_experts(model, list(active))
    return model.eval(), run_config, tag
