"""The Ray side of ``moe quantize``: joining or starting a cluster, the tasks that run the model or
GPTQ (on the calibration device), and stopping cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Optional

import torch

from moe.errors import UserError

FAULT_ENV = "MOE_QUANT_FAULT_KILL_ONCE"
"""Fault injection for tests: the first task that manages to create this file kills its own worker
process (SIGKILL), as a crashed or preempted node would."""
TASK_RETRIES = 3

# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived during a quantization (:func:`stop_on_signals`). A subclass of
    ``KeyboardInterrupt``: every ``finally`` and ``except KeyboardInterrupt`` on the way out treats
    it as a Ctrl-C (Ray is shut down, finished blocks are kept); ``moe quantize`` exits with
    128 + :attr:`signum`."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(self.name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stopping = False
"""A stop (or Ray's shutdown) is under way: a further signal is held, not raised into the clean-up."""
_held: Optional[int] = None
"""A signal that arrived while :data:`_stopping`."""


def _stop(signum: int) -> Stopped:
    """The :class:`Stopped` to raise for ``signum``; from now on further signals are held."""
    global _stopping
    _stopping = True
    return Stopped(signum)


def _raise_stopped(signum, frame) -> None:
    global _held
    if _stopping:
        _held = _held or signum
        return
    raise _stop(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_on_signals():
    """For the duration of the block, SIGTERM and SIGINT raise :class:`Stopped` in the main thread
    (once: a second signal waits for the clean-up the first one started); the previous handlers
    come back afterwards. Nests; does nothing outside the main thread."""
    global _stopping, _held
    if not _main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    outermost = any(handler is not _raise_stopped for handler in previous.values())
    if outermost:
        _stopping, _held = False, None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if outermost:
            _stopping, _held = False, None


def _shutdown_ray(ray) -> Optional[int]:
    """``ray.shutdown()`` with SIGTERM and SIGINT held back until it is done (an interrupted
    shutdown leaves Ray's processes behind); returns the signal that arrived meanwhile, if any."""
    global _stopping, _held
    was_stopping, held_before = _stopping, _held
    _stopping, _held = True, None
    try:
        ray.shutdown()
    finally:
        held, _stopping, _held = _held, was_stopping, held_before
    return held


# ------------------------------------------------------------------------------------------------
# Ray
# ------------------------------------------------------------------------------------------------


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, with a message that says what to do, when nothing listens
    at ``address`` (``HOST:PORT`` of a cluster's GCS, or ``ray://HOST:PORT`` for Ray Client)."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"--ray-address {address!r} is a dashboard (Jobs API) address; give the cluster's GCS address, e.g. "
            f"HEAD:6379, or submit the whole command with `ray job submit --address {address} -- moe quantize ...`"
        )
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, "10001" if scheme == "ray" else "6379"
    try:
        port_number = int(port)
    except ValueError:
        raise UserError(f"--ray-address {address!r} is invalid: expected HOST:PORT or ray://HOST:PORT") from None
    try:
        with socket.create_connection((host, port_number), timeout=timeout):
            pass
    except OSError as err:
        raise UserError(
            f"cannot reach a Ray cluster at {address!r} ({err.strerror or err}); is `ray start --head` running "
            f"there and is port {port_number} open?"
        ) from None


@contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Ray for the duration of the block: the cluster at ``address``; the job's cluster when run
    by ``ray job submit`` (``RAY_ADDRESS`` set); else an embedded local one, stopped afterwards.
    Reuses a Ray already initialised in this process.

    SIGTERM and SIGINT raise :class:`Stopped` inside the block (:func:`stop_on_signals`; the
    handler ``ray.init`` installs for SIGTERM, which exits from wherever the process is, is
    replaced), and Ray is shut down however the block ends, a signal during the shutdown waiting
    for it to finish."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    env_vars = {name: os.environ[name] for name in (FAULT_ENV,) if name in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is not None:
        check_reachable(address)
    with stop_on_signals():
        try:
            _init_ray(ray, address, num_cpus, runtime_env)
            yield ray
        except BaseException:
            _shutdown_ray(ray)
            raise
        held = _shutdown_ray(ray)
        if held is not None and not _stopping:
            raise _stop(held)


def _init_ray(ray, address: Optional[str], num_cpus: Optional[int], runtime_env: Optional[dict]) -> None:
    """``ray.init``, then this module's SIGTERM handler again in place of the one it installs."""
    try:
        if address is not None:
            try:
                ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR")
            except Exception as err:  # noqa: BLE001 - any failure to join is the user's cluster problem
                raise UserError(f"cannot join the Ray cluster at {address!r}: {type(err).__name__}: {err}") from None
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     runtime_env=runtime_env, logging_level="ERROR")
    except SystemExit:  # the SIGTERM handler ray.init installs first exits: a SIGTERM while Ray starts
        raise _stop(signal.SIGTERM) from None
    if _main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)


def _maybe_die() -> None:
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _model_from(config: dict, state: dict, active_experts):
    from moe import ModelConfig, MoETransformer, set_active_experts

    model = MoETransformer(ModelConfig.from_dict(config))
    model.load_state_dict(state, strict=False)
    set_active_experts(model, active_experts)
    return model.eval()


def _ebss_task(config, state, active_experts, first_tokens, seq_len, width, tau, ks, device):
    from moe.quant import ebss_generate

    _maybe_die()
    _one_thread()
    model = _model_from(config, state, active_experts).to(device)
    return ebss_generate(model, len(first_tokens), seq_len, width=width, tau=tau, first_tokens=first_tokens, ks=ks).cpu()


def _embed_task(embed_weight, input_ids):
    from moe.quant.calibrate import embed_tokens

    _maybe_die()
    return embed_tokens(embed_weight, input_ids)


def _capture_task(config, layer_idx, state, active_experts, hidden, stage, agq, device):
    from moe import ModelConfig
    from moe.quant.calibrate import block_rotary, build_block, capture_hessians

    _maybe_die()
    _one_thread()
    model_config = ModelConfig.from_dict(config)
    block = build_block(model_config, layer_idx, state, active_experts).to(device)
    hessians = capture_hessians(block, hidden.to(device), block_rotary(model_config).to(device), stage, agq)
    return {key: hessian.to("cpu") for key, hessian in hessians.items()}


def _advance_task(config, layer_idx, state, active_experts, hidden, device):
    from moe import ModelConfig
    from moe.quant.calibrate import block_rotary, build_block, run_block

    _maybe_die()
    _one_thread()
    model_config = ModelConfig.from_dict(config)
    block = build_block(model_config, layer_idx, state, active_experts).to(device)
    return run_block(block, hidden.to(device), block_rotary(model_config).to(device)).cpu()


def _solve_task(weight, hessian, spec, block_size, percdamp, act_order, eora_rank, device):
    """GPTQ of one linear; with ``eora_rank`` > 0 also its EoRA correction from the same Hessian."""
    from moe.quant import eora, gptq

    _maybe_die()
    _one_thread()
    weight, hessian = weight.to(device), hessian.to(device)
    solved = gptq(weight, hessian, spec, block_size=block_size, percdamp=percdamp, act_order=act_order)
    if eora_rank:
        solved.eora = eora(weight, solved.dequantize(), hessian, eora_rank)
    return solved.to("cpu")


MODEL_TASKS = ("_ebss_task", "_capture_task", "_advance_task", "_solve_task")
"""The tasks that run the model or GPTQ: on the calibration device (the rest is bookkeeping)."""
GPUS_PER_TASK = 0.25
"""A GPU task's share of one GPU: four shards' tasks run side by side on each GPU."""


def calibration_device(ray, requested: Optional[str] = "auto") -> str:
    """Where the calibration passes run: ``cuda`` when asked for, or by default when the Ray
    cluster has GPUs; ``cpu`` otherwise. Asking for CUDA from a cluster without GPUs is a user error."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if requested in (None, "auto"):
        return "cuda" if gpus > 0 else "cpu"
    if requested.startswith("cuda"):
        if gpus <= 0:
            raise UserError(f"--device {requested}: the Ray cluster has no GPU (resources: "
                            f"{ray.cluster_resources().get('CPU', 0):g} CPUs, no GPU)")
        return "cuda"  # a task sees the GPU Ray gave it as cuda:0
    if requested != "cpu":
        raise UserError(f"--device {requested!r} is invalid: expected cpu, cuda or auto")
    return "cpu"


class Cluster:
    """The Ray tasks of one quantization, counted as they are submitted (retries not included). The
    tasks of :data:`MODEL_TASKS` run on ``device``: each holds :data:`GPUS_PER_TASK` of a GPU
    when that is CUDA, and moves its inputs there and its results back to the CPU."""

    def __init__(self, ray, device: str = "cpu"):
        self.ray = ray
        self.device = device
        options = {"num_cpus": 1, "max_retries": TASK_RETRIES}
        gpu_options = {**options, "num_gpus": GPUS_PER_TASK} if device == "cuda" else options
        self._remote = {fn.__name__: ray.remote(**(gpu_options if fn.__name__ in MODEL_TASKS else options))(fn)
                        for fn in (_ebss_task, _embed_task, _capture_task, _advance_task, _solve_task)}
        self.tasks = 0

    def submit(self, name: str, *args):
        self.tasks += 1
        if name in MODEL_TASKS:
            args = (*args, self.device)
        return self._remote[name].remote(*args)

    def get(self, refs):
        return self.ray.get(refs)

    def put(self, value):
        return self.ray.put(value)
