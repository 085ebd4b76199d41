"""The ``moe`` command line.

    moe train --config CONFIG [--nproc N] [--resume] [--set k=v]
                                             train a MoE language model (wraps the deepspeed launcher)
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
    moe config CONFIG [--set k=v]            validate a run config, print it and its parameter counts

Mistakes a user can fix (a config value, a path, a flag: :class:`moe.errors.UserError`) print one
line on stderr and exit with status 2. Anything else is not the user's mistake: it propagates with
its traceback (exit status 1). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys

from moe.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from launch import bench, demo, evaluate, experiments, export, generate, inspect_config, quantize, slim, train

    parser = argparse.ArgumentParser(
        prog="moe",
        description="Mixture-of-Experts training, quantization and self-slimming inference.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    train.add_parser(commands)
    evaluate.add_parser(commands)
    export.add_parser(commands)
    generate.add_parser(commands)
    slim.add_parser(commands)
    quantize.add_parser(commands)
    experiments.add_parser(commands)
    inspect_config.add_parser(commands)
    demo.add_parser(commands)
    bench.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
