"""``moe export CHECKPOINT OUT``: a training checkpoint as an exported model.

CHECKPOINT is a run's ``checkpoints`` folder (its latest complete checkpoint) or one
``stepNNNNNNNN`` folder in it. OUT gets ``model.safetensors`` and ``config.json`` (see
:func:`moe.save_pretrained`); ``moe.load_pretrained(OUT)`` loads it without pickle. The export
records the data the model was trained on, so ``moe eval --model OUT`` evaluates on its validation
split by default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe.errors import UserError


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="write a checkpoint's model as safetensors + JSON config")
    parser.add_argument("checkpoint", help="a run's checkpoints folder, or one step folder in it")
    parser.add_argument("out", help="folder to write model.safetensors and config.json to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    parser.set_defaults(func=run)


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False) -> Path:
    from moe import save_pretrained
    from moe.pretrained import CONFIG_NAME, WEIGHTS_NAME
    from parallel.checkpoint import model_from_checkpoint, resolve

    root, tag = resolve(checkpoint)
    target = Path(out)
    if not overwrite and ((target / CONFIG_NAME).exists() or (target / WEIGHTS_NAME).exists()):
        raise UserError(f"{str(target)!r} already holds an exported model; pass --overwrite to replace it")
    model, run_config, tag = model_from_checkpoint(root / tag)
    source = {"checkpoint": str(root / tag), "step": int(tag.removeprefix("step"))}
    return save_pretrained(model, target, metadata={"data": run_config.get("data"), "source": source})


def run(args: argparse.Namespace) -> int:
    path = export_checkpoint(args.checkpoint, args.out, args.overwrite)
    print(f"exported {args.checkpoint} -> {path} (model.safetensors, config.json)")
    return 0
