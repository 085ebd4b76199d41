"""The ``moe`` command line.

    moe train --config CONFIG [--nproc N] [--resume] [--set k=v]
                                             train a MoE language model (deepspeed launcher or Ray Train)
    moe eval --model PATH [--k K]            validation loss, perplexity, MaxVio and tokens/s
    moe export CHECKPOINT OUT                a checkpoint as safetensors + JSON config
    moe generate --model PATH --prompt TEXT [--experts K|auto]
                                             text from a model at K active experts (KV cache)
    moe slim --model PATH [--k 1,2,4,8]      quality, speed and cost at every k; budgets pick k
    moe quantize --model PATH --out OUT [--method gptq] [--bits 4] [--calib ebss] [--agq] [--compare]
                                             GPTQ/RTN quantization with EBSS and AGQ, calibrated over Ray
    moe experiment {slimming,balancing}      train, evaluate and tabulate an experiment
    moe demo [--tokens T] [--steps S] ...    route a synthetic token stream through one MoE layer and
                                             print routing statistics
    moe bench layer                          time the MoE layer against deepspeed.moe and dense matmuls
    moe bench ep                             training step and all-to-all cost at EP=1 and EP=2
    moe bench quant --model PATH             quantization calibration time with 1 and 2 Ray workers
    moe bench kernels                        expert MLP backends vs dense matmuls of equal FLOPs (CUDA, bf16)
    moe bench step                           training step: MoE vs its dense equivalent, eager and compiled
    moe bench decode                         ms per decoded token at each k (static cache, CUDA graphs)
    moe config CONFIG [--set k=v]            validate a run config, print it and its parameter counts
    moe plan --config CONFIG --cluster FILE  memory and tokens/s of each parallel layout (DP, EP, ZeRO,
                                             micro-batch) on a cluster; --validate against measurements

Mistakes a user can fix (a config value, a path, a flag: :class:`moe.errors.UserError`) print one
line on stderr and exit with status 2. Anything else is not the user's mistake: it propagates with
its traceback (exit status 1). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module whose add_parser defines the command, the line `moe --help` shows). `moe --help`
# imports none of them (no torch: it answers at once); `moe NAME ...` imports NAME's module alone.
COMMANDS = {
    "train": ("launch.train", "train a MoE language model (deepspeed launcher or Ray Train)"),
    "eval": ("launch.evaluate", "validation loss, perplexity, MaxVio and tokens/s of a model"),
    "export": ("launch.export", "write a checkpoint's model as safetensors + JSON config"),
    "generate": ("launch.generate", "generate text at a chosen number of active experts"),
    "slim": ("launch.slim", "quality, speed and cost of one model at every k"),
    "quantize": ("launch.quantize", "GPTQ / RTN weight quantization with EBSS and AGQ, over Ray"),
    "experiment": ("launch.experiments", "train, evaluate and tabulate an experiment (slimming, balancing)"),
    "upcycle": ("launch.upcycle", "turn a trained dense model into an MoE whose experts start from its FFNs"),
    "config": ("launch.inspect_config", "validate a run config and print its model's parameter counts"),
    "demo": ("launch.demo", "train one MoE layer on a synthetic skewed stream and print routing statistics"),
    "bench": ("launch.bench", "benchmarks (printed tables, measured in one run)"),
    "plan": ("launch.plan", "estimate memory and tokens/s of each parallel layout on a cluster"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``moe`` parser: every command defined by its module, or with ``only``, that command
    defined and the others listed by name (their modules not imported)."""
    parser = argparse.ArgumentParser(
        prog="moe",
        description="Mixture-of-Experts training, quantization and self-slimming inference.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, (module, help_text) in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(commands)
        else:
            commands.add_parser(name, help=help_text)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_of(argv)
    parser = build_parser(name if name in COMMANDS else "")  # "" defines none: help and errors stay light
    args = parser.parse_args(argv)
    from moe.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"moe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
