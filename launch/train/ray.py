"""``moe train --ray``: the training job as a Ray Train run (``TorchTrainer``, Ray Train's V2 API).

Ray Train starts ``--workers`` actors, initialises torch.distributed among them (gloo on CPU,
NCCL when the workers hold GPUs) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` in each; every worker then runs the same
per-rank job as the deepspeed launcher's ranks (:func:`launch.train.job.train`: the same config,
DeepSpeed engine, expert parallelism, checkpoints and run folder). DeepSpeed adopts the process
group Ray Train made (:func:`parallel.engine.init_distributed`).

Checkpoints: after each complete DeepSpeed checkpoint in ``out_dir/checkpoints/<tag>``, every
worker calls ``ray.train.report`` (a barrier); rank 0 hands the folder to Ray Train, which copies it
to ``<storage>/<run name>/<tag>`` and from then on knows it as the run's latest checkpoint. When a
worker dies (a lost node, a killed process), Ray Train stops the others and starts a new worker
group, up to ``--max-failures`` times; its workers resume from ``ray.train.get_checkpoint()``, the
published copy, exactly as ``--resume`` does (weights, optimizer, LR schedule, sampler position,
RNG, step and k schedule are all in the checkpoint).

Without ``--ray-address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets), a local Ray with its
dashboard starts with the command and stops with it. Several machines need ``out_dir``, the data
and ``--storage`` on a filesystem every node sees at the same path.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from launch.config import RunConfig
from moe.errors import UserError

STORAGE = "ray"
"""Ray Train's storage (published checkpoints, its run state) when ``--storage`` is not given:
this folder of ``out_dir``."""
DEFAULT_MAX_FAILURES = 3
RAY_ONLY = ("workers", "gpus_per_worker", "cpus_per_worker", "ray_address", "storage", "max_failures")
"""Flags that mean something only with ``--ray`` (their defaults are None)."""
LAUNCHER_ONLY = {"nproc": "--nproc", "hostfile": "--hostfile", "num_nodes": "--num-nodes",
                 "master_addr": "--master-addr", "master_port": "--master-port"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Train (--ray)")
    group.add_argument("--ray", action="store_true",
                       help="run the ranks as Ray Train workers (TorchTrainer) instead of under the deepspeed launcher")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray Train workers, one rank each (default 1)")
    group.add_argument("--gpus-per-worker", type=int, default=None, metavar="G",
                       help="GPUs each worker holds: 1 (a rank drives one GPU) or 0 (CPU ranks, gloo); default: 1 "
                            "when the Ray cluster has GPUs, else 0")
    group.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                       help="CPUs each worker holds (default 1); Ray sets OMP_NUM_THREADS from it")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="the Ray cluster to join (HEAD:6379); default: RAY_ADDRESS (set by `ray job submit`), "
                            "else a local Ray started and stopped with this command")
    group.add_argument("--storage", default=None, metavar="PATH",
                       help=f"Ray Train's storage for published checkpoints and run state, a path every node sees "
                            f"or a URI such as s3://bucket/dir (default: OUT_DIR/{STORAGE})")
    group.add_argument("--max-failures", type=int, default=None, metavar="N",
                       help=f"times Ray Train restarts the workers after one fails, resuming from the last published "
                            f"checkpoint (default {DEFAULT_MAX_FAILURES}; -1: no limit)")


def check_arguments(args: argparse.Namespace) -> int:
    """The number of ranks of a ``--ray`` run, or a :class:`UserError` for flags that do not fit:
    the deepspeed launcher's flags, ``--workers`` below 1, a GPU count other than 0 or 1."""
    given = [flag for name, flag in LAUNCHER_ONLY.items() if getattr(args, name, None) is not None]
    if given:
        raise UserError(f"--ray starts the ranks as Ray Train workers (--workers N); {', '.join(given)} belong(s) to "
                        "the deepspeed launcher: leave out one or the other")
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if args.gpus_per_worker not in (None, 0, 1):
        raise UserError(f"--gpus-per-worker {args.gpus_per_worker} is invalid: expected 0 or 1 (each worker is one "
                        "rank, a rank drives one GPU, and NCCL does not put two ranks on one GPU; use more workers "
                        "for more GPUs)")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker:g}")
    if args.max_failures is not None and args.max_failures < -1:
        raise UserError(f"--max-failures must be >= -1 (-1: no limit), got {args.max_failures}")
    return workers


def refuse_ray_flags(args: argparse.Namespace) -> None:
    """Without ``--ray``, its flags are a mistake (a forgotten ``--ray``)."""
    given = ["--" + name.replace("_", "-") for name in RAY_ONLY if getattr(args, name, None) is not None]
    if given:
        raise UserError(f"{', '.join(given)} only apply to Ray Train runs: add --ray")


def storage_path(args: argparse.Namespace, cfg: RunConfig) -> str:
    if args.storage is None:
        return str(Path(cfg.out_dir) / STORAGE)
    if "://" in args.storage:
        return args.storage
    return str(Path(args.storage).expanduser().resolve())


def run(args: argparse.Namespace, cfg: RunConfig, resume_tag: Optional[str]) -> int:
    """Run the job on Ray Train workers and wait for it (``moe train --ray``, with the run folder's
    lock already held); returns the exit status: 0, or 128 + signal when SIGINT/SIGTERM stopped it
    (the workers stop at once; ``--resume`` continues from the last checkpoint)."""
    from launch.quantize.cluster import Stopped

    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false"):
        raise UserError("moe train --ray needs Ray Train's V2 API: unset RAY_TRAIN_V2_ENABLED")
    # print() in a worker stays print(): rank 0's progress reaches the driver's output as under the launcher
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    workers = check_arguments(args)
    cpus = 1.0 if args.cpus_per_worker is None else args.cpus_per_worker
    try:
        local_cpus = max(os.cpu_count() or 1, math.ceil(workers * cpus))  # a local Ray fits the workers
        with ray_cluster(args.ray_address, num_cpus=local_cpus) as (ray, local):
            gpus = _gpus_per_worker(ray, args.gpus_per_worker, workers, cpus, local)
            return _fit(args, cfg, resume_tag, workers, cpus, gpus)
    except Stopped as stop:
        _stderr(f"moe train: {stop.name}: the Ray Train run is stopped; continue it with --resume "
                f"(checkpoints in {Path(cfg.out_dir) / 'checkpoints'})")
        return 128 + stop.signum


@contextmanager
def ray_cluster(address: Optional[str], num_cpus: int):
    """(ray, local) for the duration of the block: the cluster at ``address``, or ``RAY_ADDRESS``'s
    (``ray job submit`` sets it), or a local Ray with its dashboard, stopped afterwards. An
    unreachable address is one :class:`UserError`. SIGINT and SIGTERM raise
    :class:`launch.quantize.cluster.Stopped` inside the block, and Ray is shut down however it ends."""
    import ray

    from launch.quantize.cluster import check_reachable, stop_on_signals

    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is not None:
        check_reachable(address)
    with stop_on_signals():
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if address is not None:
                try:
                    ray.init(address=address, logging_level="ERROR")
                except Exception as err:  # noqa: BLE001 - any failure to join is the user's cluster problem
                    raise UserError(
                        f"cannot join the Ray cluster at {address!r}: {type(err).__name__}: {err}") from None
            else:
                context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                                   dashboard_host="127.0.0.1", logging_level="ERROR")
                if context.dashboard_url:
                    _stderr(f"moe train: local Ray started (dashboard http://{context.dashboard_url})")
            if on_sigterm is not None:
                signal.signal(signal.SIGTERM, on_sigterm)  # ray.init's own handler exits from anywhere
            yield ray, address is None
        finally:
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                ray.shutdown()  # not interrupted half-way: that would leave Ray's processes behind
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


def _gpus_per_worker(ray, requested: Optional[int], workers: int, cpus: float, local: bool) -> int:
    """``--gpus-per-worker`` resolved against the cluster: by default 1 where it has GPUs, 0 where
    not. A local cluster that cannot hold the workers is a :class:`UserError` (a remote one may
    still grow: Ray Train waits for it)."""
    resources = ray.cluster_resources()
    have_gpus, have_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    gpus = (1 if have_gpus > 0 else 0) if requested is None else requested
    short = []
    if gpus * workers > have_gpus:
        short.append(f"{workers} x {gpus} GPU (it has {have_gpus:g})")
    if cpus * workers > have_cpus:
        short.append(f"{workers} x {cpus:g} CPU (it has {have_cpus:g})")
    if short:
        message = f"the Ray cluster cannot hold --workers {workers}: {' and '.join(short)}"
        if local:
            raise UserError(message)
        _stderr(f"moe train: {message} now; Ray Train waits for the resources")
    return gpus


def _fit(args: argparse.Namespace, cfg: RunConfig, resume_tag: Optional[str], workers: int, cpus: float,
         gpus: int) -> int:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    storage = storage_path(args, cfg)
    name = f"moe-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # a new Ray Train run each time
    max_failures = DEFAULT_MAX_FAILURES if args.max_failures is None else args.max_failures
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    keep = cfg.train.keep_checkpoints
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "resume_from": resume_tag, "until_step": args.until_step},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep if keep > 0 else None),
                             logging_config=LoggingConfig(log_level="WARNING")),  # its per-report INFO lines are noise
    )
    _stderr(f"moe train: Ray Train run {name}: {workers} worker(s) with {cpus:g} CPU and {gpus} GPU each, "
            f"up to {'unlimited' if max_failures < 0 else max_failures} restart(s); published checkpoints in "
            f"{storage}/{name}")
    try:
        result = _fit_off_the_main_thread(trainer)
    except TrainingFailedError as err:
        mistake = _user_error(err)
        if mistake is not None:
            raise UserError(str(mistake)) from None
        raise
    if result.checkpoint is not None:
        _stderr(f"moe train: last published checkpoint {result.checkpoint.path}")
    return 0


def _fit_off_the_main_thread(trainer):
    """``trainer.fit()`` on a thread of its own, the main thread waiting for it: signals stay this
    command's (``fit`` on the main thread installs its own SIGINT handler, and a signal that
    arrives inside ``ray.get`` comes out as a bare ``KeyboardInterrupt``, whichever it was)."""
    outcome = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _user_error(err: BaseException) -> Optional[BaseException]:
    """The first :class:`UserError` a worker raised, if that is why the run failed."""
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        for candidate in (failure, getattr(failure, "cause", None), failure.__cause__):
            if isinstance(candidate, UserError):
                return candidate
    return None


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- on each worker


def _worker(config: dict) -> None:
    """One Ray Train worker: the per-rank job, resumed from Ray Train's latest published
    checkpoint when this worker group replaces one that failed."""
    import ray.train

    from launch.train.job import train

    _quiet_reports()
    _check_device()
    published = ray.train.get_checkpoint()
    if published is None:
        status = train(config["cfg"], resume_from=config["resume_from"], until_step=config["until_step"],
                       lock_held=True, after_save=_publish)
    else:
        with published.as_directory() as folder:
            status = train(config["cfg"], until_step=config["until_step"], lock_held=True,
                           resume_source=Path(folder), after_save=_publish)
    if status != 0:
        raise RuntimeError(f"rank {os.environ.get('RANK')} stopped with status {status}")


def _check_device() -> None:
    """The job (and DeepSpeed) drive GPU ``LOCAL_RANK``; Ray Train orders each node's workers by the
    GPU it gave them, so that is this worker's GPU. Refuse to train on another worker's GPU if not."""
    import torch

    if not torch.cuda.is_available():
        return
    from ray.train.torch import get_device

    given, local_rank = get_device().index, int(os.environ["LOCAL_RANK"])
    if given != local_rank:
        raise RuntimeError(f"Ray Train gave this worker cuda:{given} but its LOCAL_RANK is {local_rank}")


def _quiet_reports() -> None:
    """Ray Train 2.60 logs an INFO line per report and rank through a logger named after its module's
    file (so ``LoggingConfig`` does not reach it); rank 0's progress is what this run shows."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _publish(step: int, folder: Path) -> None:
    """Tell Ray Train about the checkpoint just written (every rank calls: it is a barrier). Rank 0
    hands over the folder, complete with every rank's files; Ray Train copies it to its storage
    under the same name and makes it the checkpoint a restart resumes from."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
    ray.train.report({"step": step, "checkpoint": folder.name}, checkpoint=checkpoint, checkpoint_dir_name=folder.name)
