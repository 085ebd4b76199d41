"""``moe bench ...``: benchmarks that print ratios measured side by side in one run.

    moe bench layer     the MoE layer against deepspeed.moe and dense matmuls          launch.bench.layer
                        (CPU fp32, or CUDA bf16)
    moe bench ep        training step and all-to-all cost at EP=1 and EP=2 (2 ranks)   launch.bench.ep
    moe bench kernels   expert MLP backends against dense matmuls (CUDA, bf16)         launch.bench.kernels
    moe bench quant     quantization calibration with 1 and 2 Ray workers             launch.bench.quant
    moe bench step      a training step: MoE vs dense equivalent, eager and compiled;  launch.bench.step
                        moe train vs a plain loop (CUDA bf16; CPU fp32 for small runs)
    moe bench decode    ms per decoded token at each k: growing cache, static cache,   launch.bench.decode
                        CUDA graph, compiled; against the weight-read limit

Speed is measured here, never in a test: each command prints the ratios it measured in one run.
"""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    from launch.bench import decode, ep, kernels, layer, quant, step

    parser = commands.add_parser("bench", help="benchmarks (printed tables, measured in one run)")
    which = parser.add_subparsers(dest="bench", metavar="WHAT")
    which.required = True
    layer.add_parser(which)
    ep.add_parser(which)
    kernels.add_parser(which)
    quant.add_parser(which)
    step.add_parser(which)
    decode.add_parser(which)
