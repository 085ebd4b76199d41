"""``moe export CHECKPOINT OUT``: a training checkpoint as an exported model.

CHECKPOINT is a run's ``checkpoints`` folder (its latest complete checkpoint) or one
``stepNNNNNNNN`` folder in it. OUT gets ``model.safetensors`` and ``config.json`` (see
:func:`moe.save_pretrained`); ``moe.load_pretrained(OUT)`` loads it without pickle. The export
records the data the model was trained on, with absolute paths (a relative path of the run config
resolved against the run, see :func:`launch.evaluate.resolve_recorded_paths`), so ``moe eval
--model OUT`` evaluates on its validation split by default, from any directory.

OUT is never the checkpoint folder, inside it, or a folder that holds it
(:func:`check_output_apart`, which ``moe quantize`` and ``moe slim`` use for their outputs too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe.errors import UserError


def real_path(path) -> Path:
    """``path`` absolute, with ``~`` expanded, ``..`` and symbolic links resolved (a part that does
    not exist yet is kept as written)."""
    return Path(path).expanduser().resolve()


def check_output_apart(out, source, out_name: str, source_name: str, nested: bool = False) -> None:
    """A :class:`UserError` when writing to the folder ``out`` could replace or mix with the input
    folder ``source``: when they are the same folder (after resolving ``~``, ``..`` and symbolic
    links) and, unless ``nested``, when one is inside the other. Checked before anything is
    written, whatever ``--overwrite`` says."""
    out_path, source_path = real_path(out), real_path(source)
    if out_path == source_path:
        relation = "is"
    elif nested:
        return
    elif source_path in out_path.parents:
        relation = "is inside"
    elif out_path in source_path.parents:
        relation = "contains"
    else:
        return
    resolved = [f"{typed} is {real}" for typed, real in ((out, out_path), (source, source_path)) if str(typed) != str(real)]
    detail = f" ({'; '.join(resolved)})" if resolved else ""
    raise UserError(f"{out_name} {str(out)!r} {relation} {source_name} {str(source)!r}{detail}: the output would "
                    f"replace or mix with the input; choose a folder apart from it")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="write a checkpoint's model as safetensors + JSON config")
    parser.add_argument("checkpoint", help="a run's checkpoints folder, or one step folder in it")
    parser.add_argument("out", help="folder to write model.safetensors and config.json to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    parser.set_defaults(func=run)


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False) -> Path:
    from launch.evaluate import recorded_data
    from moe import save_pretrained
    from moe.pretrained import CONFIG_NAME, WEIGHTS_NAME
    from parallel.checkpoint import model_from_checkpoint, resolve

    root, tag = resolve(checkpoint)
    target = Path(out).expanduser()
    check_output_apart(target, root, "OUT", "the checkpoints folder")  # the step folders are inside it
    if not overwrite and ((target / CONFIG_NAME).exists() or (target / WEIGHTS_NAME).exists()):
        raise UserError(f"{str(target)!r} already holds an exported model; pass --overwrite to replace it")
    model, run_config, tag = model_from_checkpoint(root / tag)
    source = {"checkpoint": str(real_path(root / tag)), "step": int(tag.removeprefix("step"))}
    data = recorded_data(root / tag, run_config.get("data"))
    return save_pretrained(model, target, metadata={"data": data, "source": source})


def run(args: argparse.Namespace) -> int:
    path = export_checkpoint(args.checkpoint, args.out, args.overwrite)
    print(f"exported {args.checkpoint} -> {path} (model.safetensors, config.json)")
    return 0
