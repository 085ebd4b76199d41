"""The training job: a MoE language model trained by a DeepSpeed engine on every rank.

    moe train --config configs/tiny.yaml [--nproc N]           # this machine: the deepspeed launcher
    moe train --config C --hostfile HOSTS [--num-nodes M] [--nproc N] [--master-addr A]
                                                               # several machines: the deepspeed launcher
    moe train --config configs/tiny.yaml --ray --workers N     # Ray Train workers (a local Ray, or a cluster)
    deepspeed --num_gpus N --module launch.train --config configs/tiny.yaml [--set k=v] [--resume]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module launch.train --config configs/tiny.yaml
    python -m launch.train --config configs/tiny.yaml          # one process, no launcher

Every rank runs the same job (:mod:`launch.train.job`), whichever way it was started:
:mod:`launch.train.launcher` builds the deepspeed runner's command line and stays with its ranks;
:mod:`launch.train.ray` runs the ranks as Ray Train workers that survive a lost worker.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from launch.config import load_run_config
from launch.train.job import (  # noqa: F401 - the names other modules and tests use from launch.train
    CHECKPOINTS,
    METRICS,
    TENSORBOARD,
    _clip_gradients,
    _end_step,
    _grad_norm,
    _log_expert_parallel,
    _Logs,
    _log_train,
    _new_window,
    _peak_flops,
    _print_summary,
    _set_cpu_threads,
    _stderr,
    _StopRequest,
    _train,
    _truncate_jsonl,
    absolute_paths,
    check_checkpoint_folder,
    check_out_dir,
    train,
    train_flops_per_token,
)
from moe.errors import UserError

# ----------------------------------------------------------------------------- command line


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="train on .txt/.jsonl files (a file or a folder) instead of the config's data.path")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in out_dir/checkpoints")
    parser.add_argument("--resume-from", default=None, metavar="TAG",
                        help="continue from this checkpoint (e.g. step00000200) of out_dir/checkpoints")
    parser.add_argument("--init", default=None, metavar="PATH",
                        help="start from the weights of an exported model (moe export, moe upcycle): its model "
                             "section replaces the config's (--set model... still applies); sets train.init")
    parser.add_argument("--until-step", type=int, default=None, metavar="N",
                        help="stop after step N with a checkpoint (the schedules still run to train.steps); "
                             "continue later with --resume")


def add_parser(commands: argparse._SubParsersAction) -> None:
    from launch.train import ray as ray_train

    parser = commands.add_parser("train", help="train a MoE language model (deepspeed launcher or Ray Train)")
    _common_arguments(parser)
    launcher = parser.add_argument_group("the deepspeed launcher (default)")
    launcher.add_argument("--nproc", type=int, default=None,
                          help="ranks on this machine (default: the number of GPUs, or 1 without one); more than 1 "
                               "starts them with the deepspeed launcher. With --hostfile: ranks on each machine "
                               "(default: each host's slots)")
    launcher.add_argument("--hostfile", default=None, metavar="FILE",
                          help="train on several machines: an MPI-style hostfile, one 'HOST slots=N' line per machine "
                               "(reached by passwordless ssh from this one; see README)")
    launcher.add_argument("--num-nodes", type=int, default=None, metavar="N",
                          help="with --hostfile: use its first N hosts (default: all)")
    launcher.add_argument("--master-addr", default=None, metavar="ADDR",
                          help="with --hostfile: the address the ranks rendezvous at (default: the first host's, "
                               "as `hostname -I` there reports it)")
    launcher.add_argument("--master-port", type=int, default=None,
                          help="rendezvous port (default: a free one; 29500 with --hostfile)")
    launcher.add_argument("--stop-timeout", type=float, default=300.0, metavar="S",
                          help="after SIGINT/SIGTERM, seconds the ranks get to save and stop before they are "
                               "terminated (default 300); a second signal terminates them at once")
    ray_train.add_arguments(parser)
    parser.set_defaults(func=run_cli)


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={json.dumps(str(Path(args.data).expanduser().resolve()))}")
    if getattr(args, "init", None) is not None:
        overrides.append(f"train.init={json.dumps(str(Path(args.init).expanduser().resolve()))}")
    return overrides


def _ranks(args: argparse.Namespace) -> tuple[int, str]:
    """(the number of ranks, the flag that sets it) of a ``moe train`` command, or a
    :class:`UserError` for flags that do not fit together."""
    from launch.train import ray as ray_train
    from launch.train.launcher import multi_node_world_size, read_hostfile

    if args.ray:
        return ray_train.check_arguments(args), f"--workers {1 if args.workers is None else args.workers}"
    ray_train.refuse_ray_flags(args)
    if args.hostfile is None:
        for flag, value in (("--num-nodes", args.num_nodes), ("--master-addr", args.master_addr)):
            if value is not None:
                raise UserError(f"{flag} is for training on several machines: give their --hostfile too")
        import torch

        nproc = args.nproc if args.nproc is not None else max(1, torch.cuda.device_count())
        if nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {nproc}")
        return nproc, f"--nproc {nproc}"
    ranks = multi_node_world_size(read_hostfile(args.hostfile), args.num_nodes, args.nproc)
    return ranks, f"{ranks} ranks from --hostfile {args.hostfile}"


def run_cli(args: argparse.Namespace) -> int:
    """``moe train``: check everything a user can get wrong here, once, before any rank starts or
    anything is written; take the run folder's lock; then train in this process (one rank), start
    the ranks with the deepspeed launcher (on this machine or the hostfile's) and stay with them
    (signals are forwarded; see :func:`launch.train.launcher.run_launcher`), or run them as Ray
    Train workers (:mod:`launch.train.ray`)."""
    from launch.joblock import JobLock

    cfg = absolute_paths(load_run_config(args.config, _overrides(args)))
    resume = args.resume or args.resume_from is not None
    _end_step(cfg, args.until_step)
    world_size, source = _ranks(args)
    if world_size % cfg.parallel.expert_parallel_size:
        raise UserError(
            f"parallel.expert_parallel_size={cfg.parallel.expert_parallel_size} is invalid: it must divide the "
            f"number of ranks ({source})"
        )
    chosen = check_out_dir(cfg, resume, args.resume_from, log=_stderr)  # reads only: a refused run writes nothing
    from launch.data import check_training_data, prepare_corpus

    splits = prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.data.val_permille)  # once, before any rank starts
    t = cfg.train
    check_training_data(splits, t.seq_len, t.micro_batch_size, world_size, validate=bool(t.eval_every))
    with JobLock(cfg.out_dir) as lock:
        if lock.previous:
            _stderr(f"out_dir {cfg.out_dir}: the job that last held it (pid {lock.previous.get('pid')}) ended "
                    "without releasing it; taking it over")
        # again, now that no other job can write: the same checkpoint, its sizes (it was just hashed)
        tag = check_out_dir(cfg, resume, chosen, checksums=False, log=lambda line: None)
        if args.ray:
            from launch.train import ray as ray_train

            return ray_train.run(args, cfg, tag)
        if world_size == 1 and args.master_port is None and args.hostfile is None:
            return train(cfg, resume_from=tag, until_step=args.until_step, lock_held=True)
        return _run_launcher(args, cfg, world_size, tag)


def _run_launcher(args: argparse.Namespace, cfg, world_size: int, tag: Optional[str]) -> int:
    """The ranks under the deepspeed launcher (:mod:`launch.train.launcher`), this process staying with them."""
    from launch.train.launcher import MULTI_NODE_PORT, launcher_command, run_launcher
    from parallel.engine import free_port

    multi_node = args.hostfile is not None
    port = args.master_port or (MULTI_NODE_PORT if multi_node else free_port())
    command = launcher_command(args.config, _overrides(args), nproc=args.nproc if multi_node else world_size,
                               master_port=port, hostfile=args.hostfile, num_nodes=args.num_nodes,
                               master_addr=args.master_addr, resume_tag=tag, until_step=args.until_step)
    return run_launcher(command, args.stop_timeout, multi_node=multi_node)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of one rank (``python -m launch.train`` or under the deepspeed launcher)."""
    parser = argparse.ArgumentParser(prog="launch.train", description=__doc__.split("\n\n")[0])
    _common_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher adds it
    args = parser.parse_args(argv)
    try:
        cfg = absolute_paths(load_run_config(args.config, _overrides(args)))
        return train(cfg, resume=args.resume, until_step=args.until_step, resume_from=args.resume_from)
    except UserError as err:  # anything else keeps its traceback
        print(f"launch.train: error: {err}", file=sys.stderr)
        return 2
