"""DeepSpeed glue: the process group, the engine's config from a run's ``train`` section, and the
optimizer's parameter groups.

The trainer owns the keys that follow from ``train`` (batch sizes, AdamW, the warmup + cosine
schedule, clipping, precision); everything else in a config's ``deepspeed`` section (ZeRO stage,
bucket sizes, logging) passes through untouched.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import socket
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.errors import UserError


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or, in a plain single process, create) the default process group; returns (rank,
    world size). NCCL on GPU, gloo on CPU. Under the ``deepspeed`` launcher or torchrun the
    environment names the group; without one this process is rank 0 of 1.

    A group that already exists (Ray Train's workers get one before the job starts) is adopted:
    DeepSpeed's communication layer wraps it, its backend is kept, and ``RANK`` / ``WORLD_SIZE``
    (which the job and DeepSpeed read) must agree with it (``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` are filled in as a single machine's when missing). Whoever made it also
    destroys it.

    A group made here is destroyed when the process exits (an ``atexit`` hook): a gloo group left
    for the C++ static destructors makes a rank abort now and then after its work is done
    ("terminate called without an active exception", exit -6), and the launcher then fails the
    whole job."""
    if device_type() == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    normalize_cuda_arch_list()
    import deepspeed

    skip_shm_allreduce()
    adopted = dist.is_initialized()
    if adopted:
        _environment_of_existing_group()
    elif "RANK" not in os.environ:  # a plain `python -m launch.train`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device_type() == "cuda":
        # before the group exists: NCCL's communicator (and any collective made before a rank picks
        # its GPU) would otherwise sit on GPU 0 for every rank of the machine
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if adopted:
        # DeepSpeed's comm layer wraps the torch group as it is (no second init_process_group)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    else:
        deepspeed.init_distributed(dist_backend="nccl" if device_type() == "cuda" else "gloo", auto_mpi_discovery=False)
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _environment_of_existing_group(environ=os.environ) -> None:
    """Make the rank variables agree with the process group that exists: set the missing ones,
    refuse ones that contradict it (a rank reading another rank's files would corrupt checkpoints)."""
    actual = {"RANK": dist.get_rank(), "WORLD_SIZE": dist.get_world_size()}
    for name, value in actual.items():
        if name not in environ:
            environ[name] = str(value)
        elif int(environ[name]) != value:
            raise RuntimeError(f"{name}={environ[name]} in the environment, but this process is {name.lower()} "
                               f"{value} of the process group that already exists")
    if "LOCAL_RANK" not in environ:  # no launcher said otherwise: every rank on this machine
        environ["LOCAL_RANK"], environ["LOCAL_WORLD_SIZE"] = environ["RANK"], environ["WORLD_SIZE"]
    environ.setdefault("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def normalize_cuda_arch_list(environ=os.environ) -> Optional[str]:
    """Make ``TORCH_CUDA_ARCH_LIST`` readable by DeepSpeed's op builder; returns the new value, or
    None when nothing changed.

    Hopper and Blackwell images commonly set arch-specific entries such as ``9.0a`` (or ``10.0f``),
    which torch accepts but DeepSpeed's ``compute_capability_args`` cannot parse (``invalid literal
    for int() with base 10: '0a'``), so any op DeepSpeed JIT-builds fails. The suffix is dropped
    (``9.0a+PTX`` -> ``9.0+PTX``); the plain capability builds everything DeepSpeed's ops need."""
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = []
    for entry in value.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        number = entry[: -len("+PTX")] if ptx else entry
        match = re.fullmatch(r"(\d+)\.(\d+)[a-zA-Z]*", number)
        entries.append((f"{match.group(1)}.{match.group(2)}" if match else number) + ("+PTX" if ptx else ""))
    normalized = ";".join(dict.fromkeys(entries))
    if normalized == value:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = normalized
    return normalized


def skip_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op.

    At communicator start, DeepSpeed JIT-compiles a C++ op (two ~1.5 GB compiler processes) and,
    when all ranks are local, maps a 69 MB buffer per rank in ``/dev/shm`` that it never unlinks:
    every launch leaks it, and on a small machine tmpfs fills RAM until compilers and ranks are
    OOM-killed. The op serves only ``inference_all_reduce``, which training never calls; gloo and
    NCCL collectives do not touch it. Marking the op incompatible is how DeepSpeed itself skips
    an op it cannot build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_bf16(precision: str) -> bool:
    """``train.precision`` resolved for this machine: "auto" is bf16 on GPU and fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and device_type() == "cuda")


def deepspeed_config(section: dict, train: Any, world_size: int) -> dict:
    """The config ``deepspeed.initialize`` gets: the run's ``deepspeed`` section plus the keys the
    trainer owns, filled in from ``train`` (a :class:`launch.config.TrainConfig`)."""
    config = copy.deepcopy(section)
    config.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch_size * train.grad_accum * world_size,
        gradient_clipping=float(train.grad_clip),
        optimizer={
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # torch's own AdamW everywhere, fused into one kernel per parameter group on CUDA:
                # DeepSpeed's FusedAdam would be JIT-built on first use, which needs nvcc and an
                # arch list its op builder can parse. torch's fused AdamW is prebuilt.
                "torch_adam": True,
                **({"fused": True} if device_type() == "cuda" else {}),
            },
        },
        scheduler={
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.steps,
                # DeepSpeed refuses 0 warmup steps: warmup_steps 0 is one step already at the full rate
                "warmup_num_steps": max(1, train.warmup_steps),
                "warmup_min_ratio": 0.0 if train.warmup_steps else 1.0,
                "warmup_type": "linear",
                "cos_min_ratio": train.min_lr_ratio,
            },
        },
        bf16={"enabled": use_bf16(train.precision)},
    )
    config.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step log is noise
    config.setdefault("wall_clock_breakdown", False)
    return config


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (and stacked expert weights) decay; vectors (norm gains, biases) do not. Frozen
    router weights are buffers, not parameters, so no optimizer ever sees them."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_engine(model: nn.Module, section: dict, train: Any):
    """A DeepSpeed engine for ``model`` (whose ``.module`` is ``model``).

    Without expert parallelism this is ``deepspeed.initialize``. With it (expert parameters marked
    by :func:`parallel.expert_parallel.apply_expert_parallel`), the optimizer's parameter groups
    are split into MoE groups by DeepSpeed's own ``split_params_into_different_moe_groups_for_optimizer``
    and the engine is told the model has MoE layers (see :class:`ExpertParallelEngine`).
    """
    import deepspeed

    from parallel.expert_parallel import is_expert_parameter

    skip_shm_allreduce()
    config = deepspeed_config(section, train, dist.get_world_size())
    param_groups = parameter_groups(model, train.weight_decay)
    with _op_build_failures_explained():
        if not any(is_expert_parameter(p) for p in model.parameters()):
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=config)
            return engine
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.runtime.config import DeepSpeedConfig

        param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
        engine_class = _expert_parallel_engine_class()
        return engine_class(args=None, model=model, model_parameters=param_groups, config=config,
                            config_class=DeepSpeedConfig(config))


@contextlib.contextmanager
def _op_build_failures_explained():
    """A failure inside DeepSpeed's op builder (a JIT build of a C++/CUDA op some config option asks
    for) becomes one :class:`~moe.errors.UserError` that says what to set; anything else passes."""
    try:
        yield
    except Exception as err:
        frames = traceback.extract_tb(err.__traceback__)
        builder = next((f for f in reversed(frames) if "op_builder" in f.filename.replace("\\", "/")), None)
        if builder is None or isinstance(err, UserError):
            raise
        lines = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__
        raise UserError(
            f"DeepSpeed could not build one of its ops ({detail}, in {Path(builder.filename).name}). The trainer "
            "itself needs none: remove the deepspeed config option that asks for it, or make the build possible: "
            "nvcc matching torch's CUDA (set CUDA_HOME) and TORCH_CUDA_ARCH_LIST holding plain capabilities such "
            f"as 9.0 (it is {os.environ.get('TORCH_CUDA_ARCH_LIST', 'unset')!r})"
        ) from err


def _expert_parallel_engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        """DeepSpeed's engine, told up front that the model has MoE layers.

        DeepSpeed switches on its MoE handling (expert gradients reduced over the
        expert-data-parallel group and averaged by the full data-parallel size, expert optimizer
        state sharded over that group under ZeRO-1/2, expert parameters broadcast within it, the
        global gradient norm summed over expert shards) only when it finds its own ``MoE`` module
        class. Ours marks its expert parameters the DeepSpeed way (``allreduce=False``,
        ``group_name``), so the flag is all that is missing; nothing else is overridden.
        """

        def _configure_distributed_model(self, model):
            self.has_moe_layers = True
            super()._configure_distributed_model(model)

    return ExpertParallelEngine
