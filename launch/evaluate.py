"""Validation: loss, perplexity, MaxVio and throughput of a model on the validation split.

    moe eval --model PATH [--k K] [--data PATH] [--tokens N] [--seq-len S] [--batch-size B] [--json FILE]

PATH is an exported model (``moe export``) or a training checkpoint (the run's ``checkpoints``
folder, whose latest checkpoint is used, or one ``stepNNNNNNNN`` folder in it). The data defaults
to the corpus the model was trained on, as recorded with it; ``--data`` names another.

Recorded data paths never depend on the directory a command runs in: a relative ``cache_dir`` or
``path`` recorded with a model is resolved against its run (:func:`resolve_recorded_paths`);
``--data`` and ``--cache-dir`` typed on the command line are relative to the current directory.

One validation everywhere: the trainer, ``moe eval``, ``moe slim``, the experiments and
``moe quantize --compare`` all read the windows :func:`launch.data.validation_windows` picks from
the settings recorded with the model (``data.val_tokens`` tokens in windows of ``data.val_seq_len``,
spread evenly over the whole validation split), through :func:`validation_for`, and the same
:func:`evaluate`, which gives the loss with its standard error over windows. Inside training it runs
on every data-parallel rank, each on its share of the windows, with the sums reduced over the group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from launch.config import DataConfig
from launch.data import VAL_TOKENS, ValidationWindows, prepare_corpus, validation_batches, validation_windows
from moe.errors import UserError


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens,
    windows: ValidationWindows,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Mean next-token loss over the validation ``windows`` of the split ``tokens``
    (:func:`launch.data.validation_windows`), its standard error over windows, and MaxVio of each
    MoE layer's load summed over all of them. Ranks share the windows round-robin; the per-window
    losses are summed over the group, so the result does not depend on the number of ranks or the
    batch size (beyond float rounding)."""
    from moe import LoadMeter, max_violation, moe_layers

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    layers = dict(moe_layers(model))
    meter = LoadMeter(model)
    where = device
    if world_size > 1:
        from moe.devices import collective_device

        where = collective_device()  # the process group's device: CUDA under NCCL
    window_loss = torch.zeros(windows.count, dtype=torch.float64, device=device)  # no sync per batch
    start = time.perf_counter()
    for inputs, labels, ids in validation_batches(tokens, windows, batch_size, rank, world_size):
        logits = model(inputs.to(device))
        if ids[0] < 0:
            continue  # a padding forward: this rank has no window left, the others exchange tokens
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), reduction="none")
        window_loss.index_add_(0, ids.to(device), per_token.view(labels.shape).double().mean(dim=1))
        meter.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    loads = meter.stacked_load().to(where)  # [L, max E]
    totals = torch.tensor([meter.dropped, meter.assignments, elapsed], dtype=torch.float64, device=where)
    window_loss = window_loss.to(where)
    if world_size > 1:
        dist.all_reduce(window_loss)
        dist.all_reduce(loads)
        dist.all_reduce(totals[:2])
        dist.all_reduce(totals[2:], op=dist.ReduceOp.MAX)
    loads = loads.cpu()
    model.train(was_training)
    dropped, assignments, seconds = totals.tolist()
    losses = window_loss.cpu()
    mean_loss = float(losses.mean())
    stderr = float(losses.std(unbiased=True) / math.sqrt(windows.count)) if windows.count > 1 else float("nan")
    per_layer = {name: max_violation(load) for name, load in meter.per_layer(loads).items()}
    return {
        "loss": mean_loss,
        "loss_stderr": stderr,
        "perplexity": math.exp(min(mean_loss, 700.0)),
        "tokens": windows.tokens,
        "windows": windows.count,
        "documents": windows.documents,
        "total_documents": windows.total_documents,
        "validation": windows.describe(),
        "window_losses": losses.tolist(),
        "seconds": float(seconds),
        "tokens_per_s": windows.tokens / max(float(seconds), 1e-9),
        "max_vio": sum(per_layer.values()) / len(per_layer),
        "max_vio_per_layer": per_layer,
        "dropped_fraction": dropped / max(1.0, assignments),
        "k": [layer.active_experts for layer in layers.values()],
    }


def paired_difference(result: dict, reference: dict) -> tuple[float, float]:
    """Mean and standard error of the per-window loss difference ``result - reference``, two
    :func:`evaluate` results on the same windows: a paired comparison, far tighter than the two
    losses' own standard errors (the windows' difficulty cancels); NaN error for one window."""
    if len(result["window_losses"]) != len(reference["window_losses"]):
        raise ValueError(f"paired_difference: {len(result['window_losses'])} windows against "
                         f"{len(reference['window_losses'])}: not the same validation")
    diff = torch.tensor(result["window_losses"], dtype=torch.float64) - torch.tensor(reference["window_losses"],
                                                                                  dtype=torch.float64)
    return float(diff.mean()), (float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan"))


def format_loss(loss: float, stderr: Optional[float] = None, digits: int = 4) -> str:
    """``1.6012 ± 0.0123``: a validation loss with its standard error over windows (the bare loss
    when there is none, or one window gave NaN)."""
    if stderr is None or math.isnan(stderr):
        return f"{loss:.{digits}f}"
    return f"{loss:.{digits}f} ± {stderr:.{digits}f}"


DEFAULT_CACHE_DIR = DataConfig.cache_dir
"""The cache folder of a data config that names none (a run config's default, relative)."""


def recorded_base(model_path) -> Path:
    """The run folder that relative data paths recorded with the model at ``model_path`` resolve
    against (never the current directory): ``RUN`` for an export at ``RUN/export``, the run's
    ``out_dir`` (the folder holding ``checkpoints``) for a checkpoint. Runs record absolute paths
    (``launch.train``); this serves models recorded before they did, and hand-written metadata."""
    from moe.pretrained import CONFIG_NAME
    from parallel.checkpoint import RUN_CONFIG

    path = Path(model_path).expanduser().resolve()
    if (path / CONFIG_NAME).is_file():  # an export
        return path.parent
    if (path / RUN_CONFIG).is_file():  # one step folder of RUN/checkpoints
        return path.parent.parent
    return path.parent  # RUN/checkpoints


def recorded_data(model_path, data_meta: Optional[dict]) -> dict:
    """The data config recorded with the model at ``model_path`` with absolute paths: a relative
    ``path`` or ``cache_dir`` (or none: :data:`DEFAULT_CACHE_DIR`) joined to
    :func:`recorded_base`; ``val_permille`` 50 when absent."""
    data = dict(data_meta) if isinstance(data_meta, dict) else {}
    base: list[Path] = []

    def absolute(value) -> str:
        if not isinstance(value, (str, os.PathLike)):
            raise UserError(f"the data recorded with {str(model_path)!r} is invalid: a path is {value!r}; "
                            f"give the data with --data and --cache-dir")
        value = Path(value).expanduser()
        if value.is_absolute():
            return str(value)
        if not base:
            base.append(recorded_base(model_path))
        return os.path.normpath(base[0] / value)

    if data.get("path") is not None:
        data["path"] = absolute(data["path"])
    data["cache_dir"] = absolute(data.get("cache_dir") or DEFAULT_CACHE_DIR)
    data.setdefault("val_permille", 50)
    return data


def resolve_recorded_paths(model_path, data_meta: Optional[dict]) -> tuple[Optional[str], str, int]:
    """(data path or None for the built-in corpus, cache folder, val_permille) of the data recorded
    with the model at ``model_path`` (an export or a checkpoint), the paths absolute and never
    relative to the current directory (:func:`recorded_data`). Every command that reads a model's
    training data (eval, slim, quantize, experiment) goes through here."""
    data = recorded_data(model_path, data_meta)
    return data.get("path"), data["cache_dir"], int(data["val_permille"])


def load_model_for_eval(path: str, device=None) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, the data config it was trained with, its paths absolute:
    :func:`recorded_data`) from an export or a checkpoint. ``device``: None for the GPU when there
    is one, else the CPU."""
    from moe import load_pretrained
    from moe.devices import resolve_device
    from moe.files import read_json
    from moe.pretrained import CONFIG_NAME
    from parallel.checkpoint import model_from_checkpoint

    device = resolve_device(device)
    root = Path(path)
    if (root / CONFIG_NAME).is_file():
        model = load_pretrained(root, device=device)
        meta = read_json(root / CONFIG_NAME, what="exported model's config")
        return model, recorded_data(root, meta.get("data"))
    if not root.exists():
        raise UserError(f"model path {path!r} does not exist")
    model, run_config, _ = model_from_checkpoint(root)
    return model.to(device), recorded_data(root, run_config.get("data"))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, the same for every command that runs a model."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or cuda:N (default auto: the GPU when there is one, else the CPU)")


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--tokens``, ``--seq-len``, ``--batch-size``, ``--cache-dir``: the same for
    every command that validates a model (eval, slim, experiment, quantize --compare)."""
    parser.add_argument("--data", default=None, help="a .txt/.jsonl file or folder (default: the training corpus)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="validation tokens (default: as recorded with the model, data.val_tokens; 65536)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per validation window (default: as recorded, the training seq_len)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward (default 16; speed only)")
    parser.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: as in training)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="validation loss, perplexity, MaxVio and tokens/s of a model")
    parser.add_argument("--model", required=True, help="an exported model folder or a training checkpoint folder")
    parser.add_argument("--k", type=int, default=None, help="active experts per MoE layer (default: as saved)")
    add_validation_arguments(parser)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def validation_for(path: str, model: nn.Module, trained_on: dict, data: Optional[str] = None,
                   cache_dir: Optional[str] = None, tokens: Optional[int] = None,
                   seq_len: Optional[int] = None):
    """``(split tokens, windows)`` a model at ``path`` is validated on: the corpus, window length
    and token count recorded with it (``data.val_seq_len``, ``data.val_tokens``), each replaceable
    (``data``: another corpus, whose split holds out 5%). Every command that validates a model
    calls this, so the same model is measured on the same windows everywhere."""
    tokens = tokens if tokens is not None else int(trained_on.get("val_tokens") or VAL_TOKENS)
    seq_len = seq_len or trained_on.get("val_seq_len") or model.config.max_seq_len
    if tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is invalid: expected 1..{model.config.max_seq_len} (the model's max_seq_len)")
    trained_path, trained_cache, trained_permille = resolve_recorded_paths(path, trained_on)
    splits = prepare_corpus(
        data if data is not None else trained_path,
        cache_dir or trained_cache,  # --cache-dir: relative to the current directory, as typed
        trained_permille if data is None else 50,
    )
    return splits.val, validation_windows(splits.val, int(seq_len), tokens)


def evaluate_path(
    path: str,
    k: Optional[int] = None,
    data: Optional[str] = None,
    cache_dir: Optional[str] = None,
    tokens: Optional[int] = None,
    batch_size: int = 16,
    seq_len: Optional[int] = None,
    device=None,
) -> dict:
    """Programmatic ``moe eval``: :func:`evaluate` on the model at ``path`` (export or checkpoint),
    on ``device`` (None: the GPU when there is one), on :func:`validation_for`'s windows."""
    from moe import set_active_experts
    from moe.devices import describe_device

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    model, trained_on = load_model_for_eval(path, device)
    if k is not None:
        set_active_experts(model, k)
    split, windows = validation_for(path, model, trained_on, data, cache_dir, tokens, seq_len)
    result = evaluate(model, split, windows, batch_size)
    result.update(model=str(path), num_experts=model.config.moe.num_experts, seq_len=windows.seq_len,
                  device=describe_device(next(model.parameters()).device))
    return result


def run(args: argparse.Namespace) -> int:
    result = evaluate_path(args.model, args.k, args.data, args.cache_dir, args.tokens, args.batch_size, args.seq_len,
                           args.device)
    ks = result["k"]
    k_text = str(ks[0]) if len(set(ks)) == 1 else str(ks)
    print(f"model      {result['model']}")
    print(f"device     {result['device']}")
    print(f"k          {k_text} of {result['num_experts']} experts")
    print(f"validation {result['validation']}")
    print(f"val loss   {format_loss(result['loss'], result['loss_stderr'])} (± one standard error over the windows)")
    print(f"perplexity {result['perplexity']:.3f}")
    print(f"MaxVio     {result['max_vio']:.3f} (mean over MoE layers, load summed over the validation set)")
    print(f"tokens/s   {result['tokens_per_s']:,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
