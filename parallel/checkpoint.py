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
barrier, rank 0 writes ``manifest.json`` (every file's size and SHA-256, and the id of the run that
wrote it), and then points ``<root>/latest`` at the tag by writing a temporary file and renaming
it. A run killed mid-save leaves ``latest`` naming the previous, complete checkpoint.

Finding one never trusts a single file: :func:`latest_tag` takes the tag ``latest`` names only if
that checkpoint is complete, and otherwise the newest complete one (``latest`` empty, garbage or
naming a missing tag). :func:`find_checkpoint` also checks the files against the manifest and
skips a corrupted checkpoint (a truncated or changed file) for the one before it, saying which it
skipped and why. Pruning deletes only checkpoints of the run that is pruning.
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer"
TAG_PREFIX = "step"


class CheckpointError(UserError):
    """A checkpoint the user named is missing, incomplete, or from a different model."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def is_complete(folder: Path) -> bool:
    """Whether every rank finished writing this checkpoint: its manifest exists (written after the
    barrier), or, for a checkpoint from before manifests, its run config and model states do."""
    return (folder / RUN_CONFIG).is_file() and ((folder / MANIFEST).is_file() or (folder / MODEL_STATES).is_file())


def checkpoint_tags(root: str | os.PathLike) -> list[str]:
    """Every ``stepNNNNNNNN`` folder in ``root``, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
                  and p.name[len(TAG_PREFIX):].isdigit())


def complete_tags(root: str | os.PathLike) -> list[str]:
    """The complete checkpoints in ``root``, oldest first."""
    return [tag for tag in checkpoint_tags(root) if is_complete(Path(root) / tag)]


def latest_tag(root: str | os.PathLike) -> Optional[str]:
    """The newest complete checkpoint of ``root``: the one ``root/latest`` names when that one is
    complete, else (``latest`` missing, empty, garbage, or naming an incomplete or missing tag) the
    newest complete one; None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    try:
        named = pointer.read_text().strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        named = ""
    if named and "/" not in named and is_complete(root / named):
        return named
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, run_id: Optional[str], step: int) -> None:
    """``folder/manifest.json``: the size and SHA-256 of every file under ``folder``, the run's id
    and the step (written by one rank, after every rank finished writing)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name):
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": _file_digest(path)}
    _write_atomic(folder / MANIFEST, json.dumps({"run_id": run_id, "step": step, "files": files}, indent=1))


def read_manifest(folder: Path) -> Optional[dict]:
    """The manifest of a checkpoint folder, or None (a checkpoint from before manifests)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST}: not a checkpoint manifest")
    return manifest


def verify(folder: Path, checksums: bool = True) -> Optional[str]:
    """What is wrong with the checkpoint in ``folder`` (a missing, truncated or changed file), or
    None when every file its manifest lists is there with its size (and, with ``checksums``, its
    SHA-256). A checkpoint without a manifest can only be checked for its run config and model
    states."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError as err:
        return str(err)
    if manifest is None:
        return None if is_complete(folder) else f"{folder.name} is incomplete (no {RUN_CONFIG} or {MODEL_STATES})"
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size:,} bytes, {expected.get('bytes'):,} when written"
        if checksums and _file_digest(path) != expected.get("sha256"):
            return f"{name} differs from what was written (SHA-256 mismatch)"
    return None


def find_checkpoint(root: str | os.PathLike, tag: Optional[str] = None, checksums: bool = True
                    ) -> tuple[Optional[str], list[str]]:
    """(tag, skipped): with ``tag``, that checkpoint if it is complete and intact (else a
    :class:`CheckpointError` saying why); without, the newest intact complete checkpoint of
    ``root`` (None if there is none) and one line for each newer one skipped because it is corrupted."""
    root = Path(root)
    if tag is not None:
        folder = root / tag
        if not folder.is_dir():
            known = ", ".join(complete_tags(root)) or "none"
            raise CheckpointError(f"checkpoint {tag!r} is not in {str(root)!r} (complete checkpoints: {known})")
        if not is_complete(folder):
            raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: its save did not finish")
        problem = verify(folder, checksums)
        if problem:
            raise CheckpointError(f"checkpoint {str(folder)!r} is corrupted: {problem}")
        return tag, []
    skipped = []
    newest_first = complete_tags(root)[::-1]
    named = latest_tag(root)  # normally the newest; a pointer that names an older one is honoured first
    if named in newest_first:
        newest_first.remove(named)
        newest_first.insert(0, named)
    for candidate in newest_first:
        problem = verify(root / candidate, checksums)
        if problem is None:
            return candidate, skipped
        skipped.append(f"checkpoint {candidate} is corrupted ({problem}); skipped it")
    return None, skipped


def resolve(path: str | os.PathLike) -> tuple[Path, str]:
    """(root, tag) of an intact checkpoint named either by its root (the newest intact one) or by its
    tag folder; a missing, incomplete or corrupted one is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if is_complete(path):
        return path.parent, find_checkpoint(path.parent, path.name)[0]
    tag, skipped = find_checkpoint(path)
    if tag is None:
        detail = f": {'; '.join(skipped)}" if skipped else f" (no '{LATEST}' file naming a finished one)"
        raise CheckpointError(f"{str(path)!r} holds no complete checkpoint{detail}")
    return path, tag


def read_run_config(root: str | os.PathLike, tag: str) -> dict:
    from moe.files import read_json

    return read_json(Path(root) / tag / RUN_CONFIG, what="run config of the checkpoint")


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
    """Write the checkpoint of ``step`` on every rank, then its manifest, then publish it as
    ``latest``; with ``keep > 0``, delete all but the ``keep`` newest complete checkpoints of this
    run (``trainer_state["run_id"]``). Returns the tag."""
    root, tag = Path(root), tag_for_step(step)
    verify_replicas(engine.module)  # rank 0 writes the replicated tensors for everyone
    engine.save_checkpoint(str(root), tag=tag, client_state={TRAINER_STATE: trainer_state}, save_latest=False)
    save_portable(engine, root / tag)
    if dist.get_rank() == 0:
        _write_atomic(root / tag / RUN_CONFIG, json.dumps(run_config, indent=2))
    dist.barrier()  # every rank's files are on disk before the manifest lists them
    run_id = trainer_state.get("run_id")
    if dist.get_rank() == 0:
        write_manifest(root / tag, run_id, step)
        _write_atomic(root / LATEST, tag)
        if keep > 0:
            _prune(root, keep, protect=tag, run_id=run_id)
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
    """(first, last, num_experts) of this rank's experts in the first MoE layer, or None when
    experts are not sharded (names the shard files)."""
    spans = _expert_spans(model)
    return next(iter(spans.values())) if spans else None


def _expert_spans(model) -> dict[str, tuple[int, int, int]]:
    """``"<layer>.experts."`` -> (first, last, num_experts) of this rank's slice of that layer's
    experts (layers may differ in E: a PR-MoE pyramid); empty when experts are not sharded."""
    from moe.metrics import moe_layers

    return {f"{name}.experts.": (*layer.expert_range, layer.num_experts) for name, layer in moe_layers(model)
            if getattr(layer, "expert_range", None) is not None}


def _span_of(spans: dict, name: str) -> Optional[tuple[int, int, int]]:
    return next((span for prefix, span in spans.items() if name.startswith(prefix)), None)


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
    spans = _expert_spans(model)
    if dist.get_rank() == 0:
        for kind, tensors in replicated.items():
            _save_tensors(folder / f"{kind}.safetensors", tensors, {})
    if spans and _is_expert_writer(model):
        first, last, _ = next(iter(spans.values()))  # the first layer's slice names the file
        for kind, tensors in experts.items():
            # each tensor's own slice: layers may differ in E
            ranges = {key: list(_span_of(spans, key.rsplit(".exp_avg", 1)[0])) for key in tensors}
            meta = {"expert_ranges": json.dumps(ranges)}
            _save_tensors(folder / f"{kind}.experts-{first:05d}-{last:05d}.safetensors", tensors, meta)


def _save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_portable(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    from moe.files import load_safetensors, read_safetensors_metadata

    replicated = folder / f"{kind}.safetensors"
    if not replicated.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {replicated.name} (not written by this trainer?)")
    state = load_safetensors(replicated)  # a truncated or corrupted file: one line naming it
    shards = sorted(folder.glob(f"{kind}.experts-*.safetensors"))
    if not shards:
        return state
    pieces: dict[str, list] = {}  # name -> [(first, last, total, tensor)]
    for shard in shards:
        meta = read_safetensors_metadata(shard)
        try:
            if "expert_ranges" in meta:  # one slice per tensor
                ranges = {key: tuple(int(v) for v in span) for key, span in json.loads(meta["expert_ranges"]).items()}
            else:  # written before per-layer expert counts: one slice for every tensor of the file
                uniform = int(meta["first_expert"]), int(meta["last_expert"]), int(meta["num_experts"])
                ranges = None
        except (KeyError, ValueError, TypeError):
            raise CheckpointError(f"{shard}: no expert range in its metadata (not written by this trainer?)") from None
        for key, tensor in load_safetensors(shard).items():
            span = uniform if ranges is None else ranges.get(key)
            if span is None or len(span) != 3:
                raise CheckpointError(f"{shard}: no expert range for {key!r} in its metadata")
            pieces.setdefault(key, []).append((*span, tensor))
    for key, parts in pieces.items():
        parts.sort(key=lambda part: part[0])
        expected_first, total = 0, parts[0][2]
        for first, last, _, _ in parts:
            if first != expected_first:
                raise CheckpointError(f"checkpoint {str(folder)!r} lacks experts {expected_first}..{first - 1} of "
                                      f"{key} ({kind})")
            expected_first = last
        if expected_first != total:
            raise CheckpointError(f"checkpoint {str(folder)!r} lacks experts {expected_first}..{total - 1} of "
                                  f"{key} ({kind})")
        state[key] = torch.cat([part[3] for part in parts])
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
    spans = _expert_spans(model)
    steps = int(trainer_state(root, tag)["step"])
    for name, tensor, is_param in _named_state(model):
        if name not in weights:
            raise CheckpointError(f"checkpoint {str(folder)!r} has no tensor {name!r}")
        span = _span_of(spans, name) if is_param and is_expert_parameter(tensor) else None
        local = (lambda full, span=span: full[span[0]:span[1]]) if span is not None else (lambda full: full)
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


def _prune(root: Path, keep: int, protect: str, run_id: Optional[str]) -> None:
    """Delete all but the ``keep`` newest complete checkpoints written by run ``run_id``; another
    run's checkpoints (or ones from before manifests recorded the run) are never touched."""
    mine = []
    for tag in complete_tags(root):
        try:
            manifest = read_manifest(root / tag)
        except CheckpointError:
            continue
        if manifest is not None and run_id is not None and manifest.get("run_id") == run_id:
            mine.append(tag)
    for old in mine[:-keep]:
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
