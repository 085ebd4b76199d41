"""``moe quantize``: post-training quantization of an exported model, its calibration spread over Ray.

    moe quantize --model PATH --out OUT [--method {rtn,gptq}] [--bits 4] [--calib {random,ebss}]
                 [--agq] [--group-size G] [--asym] [--act-order] [--experts K] [--ray-address ADDR]
    moe quantize --compare --model PATH --out DIR [--bits 3,4]

The work (the algorithms are in :mod:`moe.quant`; this module only schedules them):

1. the calibration set: ``random`` windows of the model's training corpus (GPTQ's usual choice), or
   ``ebss`` sequences the model writes itself (MoEQuant's expert-balanced self-sampling), one Ray
   task per shard of sequences;
2. block by block, as GPTQ does, the inputs of block l coming from the blocks before it *already
   quantized*: one Ray task per shard captures the Hessians of stage 1 (attention and router),
   one task per linear solves it; then, with the quantized router in place, the routing is
   recorded again and stage 2 captures each expert's Hessians (under ``--agq`` every token
   weighted by its gate), one task per (expert, linear) solves them; one task per shard then runs
   the finished block to give the next block its inputs;
3. every finished block is written to ``OUT/.partial/``; a job started again with the same
   settings (after a crash, a Ctrl-C or a lost cluster) resumes after the last finished block;
4. the quantized export in OUT (packed weights, :mod:`moe.quant.storage`), loadable with
   ``moe.load_pretrained`` and every command that takes ``--model``. It records the source
   model's training data with absolute paths (:func:`launch.evaluate.resolve_recorded_paths`).

OUT is never the model folder, inside it, or a folder that holds it
(:func:`launch.export.check_output_apart`), with or without ``--overwrite``.

SIGTERM and SIGINT stop a quantization cleanly (:func:`stop_on_signals`): the work in flight is
abandoned, an embedded Ray is shut down, the finished blocks stay in ``OUT/.partial``, and ``moe
quantize`` says so in one line and exits with 128 + the signal's number (143, 130).

Ray: with no ``--ray-address`` an embedded local Ray is started (and stopped); inside a Ray job
(``ray job submit ... -- moe quantize ...``, where ``RAY_ADDRESS`` is set) the job's cluster is
used; with an address, that cluster is joined (an unreachable one fails within seconds). Tasks
are retried when their worker dies; results do not depend on the number of workers (the shards
are fixed by ``--shards``, not by the cluster).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from moe.errors import UserError

PARTIAL_DIR = ".partial"
FAULT_ENV = "MOE_QUANT_FAULT_KILL_ONCE"
"""Fault injection for tests: the first task that manages to create this file kills its own worker
process (SIGKILL), as a crashed or preempted node would."""
TASK_RETRIES = 3


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


@dataclass
class QuantizeOptions:
    """What to quantize and how; everything that changes the result (the resume key)."""

    method: str = "gptq"
    """``rtn`` (round to nearest, no calibration) or ``gptq``."""
    bits: int = 4
    """Weight bits, 2..8."""
    group_size: int = -1
    """Input columns per scale group; -1: one scale per output row."""
    symmetric: bool = True
    """Symmetric grid (zero point in the middle) or asymmetric (min-max)."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing Hessian diagonal."""
    calib: str = "random"
    """Calibration set: ``random`` corpus windows or ``ebss`` self-sampled sequences."""
    agq: bool = False
    """Affinity-guided GPTQ: weight each token of an expert's Hessian by its gate weight."""
    num_sequences: Optional[int] = None
    """Calibration sequences (default: sized to the model, :func:`moe.quant.default_calibration_size`)."""
    seq_len: Optional[int] = None
    """Tokens per calibration sequence (default: sized to the model)."""
    ebss_width: int = 4
    """EBSS search width w."""
    ebss_tau: float = 1.2
    """EBSS balance weight tau."""
    experts: Optional[int] = None
    """Active experts k while calibrating (default: the k saved with the model)."""
    seed: int = 0
    """Seed of the random windows and of EBSS's first tokens."""
    shards: int = 4
    """Calibration shards (one Ray task each per step); fixed, so results do not depend on the cluster."""
    block_size: int = 128
    """GPTQ's lazy-update block of columns."""
    percdamp: float = 0.01
    """GPTQ's dampening, as a fraction of the mean Hessian diagonal."""

    def __post_init__(self) -> None:
        from moe.quant import QuantSpec

        choices = {"method": ("rtn", "gptq"), "calib": ("random", "ebss")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} {getattr(self, name)!r} is invalid: expected one of {', '.join(allowed)}")
        QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)
        positive = {"ebss_width": self.ebss_width, "shards": self.shards, "block_size": self.block_size}
        for name, value in {**positive, "num_sequences": self.num_sequences, "seq_len": self.seq_len,
                            "experts": self.experts}.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"--{name.replace('_', '-')} {value!r} is invalid: expected an integer >= 1")
        if not self.ebss_tau > 0 or not 0 <= self.percdamp:
            raise UserError(f"--ebss-tau {self.ebss_tau} must be > 0 and --percdamp {self.percdamp} >= 0")
        if self.method == "rtn" and self.agq:
            raise UserError("--agq weights GPTQ's Hessians by the gates; it needs --method gptq")

    @property
    def spec(self):
        from moe.quant import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def label(self) -> str:
        if self.method == "rtn":
            return "RTN"
        return "GPTQ" + (" + EBSS" if self.calib == "ebss" else "") + (" + AGQ" if self.agq else "")

    def key(self) -> dict:
        """The settings a partial job must share to be resumed."""
        values = asdict(self)
        if self.method == "rtn":  # nothing about calibration matters
            for name in ("calib", "agq", "num_sequences", "seq_len", "ebss_width", "ebss_tau", "seed", "shards",
                         "block_size", "percdamp", "act_order"):
                values.pop(name)
        return values


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


def _ebss_task(config, state, active_experts, first_tokens, seq_len, width, tau, device):
    from moe.quant import ebss_generate

    _maybe_die()
    _one_thread()
    model = _model_from(config, state, active_experts).to(device)
    return ebss_generate(model, len(first_tokens), seq_len, width=width, tau=tau, first_tokens=first_tokens).cpu()


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


def _solve_task(weight, hessian, spec, block_size, percdamp, act_order, device):
    from moe.quant import gptq

    _maybe_die()
    _one_thread()
    solved = gptq(weight.to(device), hessian.to(device), spec, block_size=block_size, percdamp=percdamp,
                  act_order=act_order)
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


# ------------------------------------------------------------------------------------------------
# Calibration sets
# ------------------------------------------------------------------------------------------------


def calibration_size(model, options: QuantizeOptions) -> tuple[int, int]:
    from moe.quant import default_calibration_size

    num_sequences, seq_len = default_calibration_size(model)
    num_sequences, seq_len = options.num_sequences or num_sequences, options.seq_len or seq_len
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    return num_sequences, seq_len


def training_tokens(meta: dict, data: Optional[str]):
    """The training split of ``data`` or, by default, of the corpus recorded in ``meta`` (an
    export's config as :func:`_read_export_meta` returns it: the recorded paths made absolute)."""
    from launch.data import prepare_corpus
    from launch.evaluate import DEFAULT_CACHE_DIR

    trained_on = meta.get("data") or {}
    cache_dir = trained_on.get("cache_dir") or DEFAULT_CACHE_DIR
    if not Path(cache_dir).expanduser().is_absolute():
        raise ValueError(f"training_tokens needs the recorded paths made absolute (_read_export_meta), got {cache_dir!r}")
    splits = prepare_corpus(data if data is not None else trained_on.get("path"), cache_dir,
                            trained_on.get("val_permille", 50) if data is None else 50)
    return splits.train


def shard_slices(count: int, shards: int) -> list[slice]:
    """``count`` items cut into at most ``shards`` contiguous, nearly equal, non-empty slices."""
    shards = max(1, min(shards, count))
    bounds = [round(i * count / shards) for i in range(shards + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def make_calibration(model, meta: dict, options: QuantizeOptions, cluster: Optional[Cluster], data=None,
                     progress: bool = False) -> torch.Tensor:
    """The calibration token ids ``[n, L]`` (``random`` windows, or ``ebss`` over Ray)."""
    from moe.quant import ebss_first_tokens, random_windows

    num_sequences, seq_len = calibration_size(model, options)
    if options.calib == "random":
        return random_windows(training_tokens(meta, data), num_sequences, seq_len, options.seed)
    first = ebss_first_tokens(num_sequences, model.config.vocab_size, options.seed)
    config, state = model.config.to_dict(), cluster.put(_state(model))
    k = [layer.active_experts for layer in _moe_layers(model)]
    refs = [cluster.submit("_ebss_task", config, state, k, first[part], seq_len, options.ebss_width, options.ebss_tau)
            for part in shard_slices(num_sequences, options.shards)]
    return torch.cat(_gather(cluster, refs, "EBSS", progress))


def calibration_sigma(model, input_ids: torch.Tensor, device: str = "cpu") -> float:
    """MoEQuant's expert-balance sigma of the calibration set under ``model``'s routing, measured on
    ``device`` (a copy of the model goes there; the caller's stays where it is)."""
    import copy

    from moe.quant import expert_balance_sigma, expert_usage

    runner = model if torch.device(device) == next(model.parameters()).device else copy.deepcopy(model).to(device)
    return float(expert_balance_sigma(expert_usage(runner, input_ids)))


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def _state(model) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _moe_layers(model):
    from moe import moe_layers

    return [layer for _, layer in moe_layers(model)]


def _layer_k(model, layer_idx: int) -> int:
    ffn = model.blocks[layer_idx].ffn
    return getattr(ffn, "active_experts", 1)


def _gather(cluster: Cluster, refs: list, what: str, progress: bool) -> list:
    if not progress or len(refs) < 2:
        return cluster.get(refs)
    from tqdm import tqdm

    results = {}
    pending = {ref: i for i, ref in enumerate(refs)}
    with tqdm(total=len(refs), desc=what, unit="task", leave=False, dynamic_ncols=True) as bar:
        while pending:
            done, _ = cluster.ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = cluster.get(ref)
                bar.update(1)
    return [results[i] for i in range(len(refs))]


class Progress:
    """``OUT/.partial``: the job's settings, its calibration set and one file per finished block."""

    def __init__(self, out: Path, key: dict, overwrite: bool):
        self.root = out / PARTIAL_DIR
        self.key = key
        job = self.root / "job.json"
        if job.exists():
            from moe.files import read_json

            saved = read_json(job, what="unfinished quantization's settings (--overwrite discards it)")
            if saved != key and not overwrite:
                changed = sorted(name for name in set(saved) | set(key) if saved.get(name) != key.get(name))
                raise UserError(
                    f"{str(out)!r} holds an unfinished quantization with other settings ({', '.join(changed)}); "
                    f"pass --overwrite to discard it or choose another --out"
                )
            if saved != key:
                shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        job.write_text(json.dumps(key, indent=2))

    def _block_path(self, layer_idx: int) -> Path:
        return self.root / f"block_{layer_idx:04d}.safetensors"

    def load_calibration(self) -> Optional[torch.Tensor]:
        from moe.files import load_safetensors

        path = self.root / "calibration.safetensors"
        if not path.exists():
            return None
        tensors = load_safetensors(path)
        if "input_ids" not in tensors:
            raise UserError(f"{path}: holds no input_ids (not a calibration set); pass --overwrite to start over")
        return tensors["input_ids"]

    def save_calibration(self, input_ids: torch.Tensor) -> None:
        _atomic_save({"input_ids": input_ids.contiguous()}, self.root / "calibration.safetensors")

    def load_block(self, layer_idx: int):
        """``{param: QuantizedWeight or [per expert]}`` of a finished block, or None."""
        from moe.files import load_safetensors, read_safetensors_metadata
        from moe.quant import QuantizedWeight, QuantSpec, unpack_codes

        path = self._block_path(layer_idx)
        if not path.exists():
            return None
        meta = read_safetensors_metadata(path)  # a truncated or corrupted file: one line naming it
        tensors = load_safetensors(path)
        try:
            entries = json.loads(meta["tensors"])
            spec = QuantSpec.from_dict(json.loads(meta["spec"]))
            solved = {}
            for param, entry in entries.items():
                codes = unpack_codes(tensors[f"{param}.qweight"], spec.bits, entry["in_features"])
                scales, zeros = tensors[f"{param}.scales"], tensors[f"{param}.zeros"].float()
                if entry["experts"]:
                    solved[param] = [QuantizedWeight(c, s, z, spec) for c, s, z in zip(codes, scales, zeros)]
                else:
                    solved[param] = QuantizedWeight(codes, scales, zeros, spec)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: not a finished block of this quantization ({type(err).__name__}: {err}); "
                            "pass --overwrite to start over") from None
        return solved

    def save_block(self, layer_idx: int, solved: dict, spec) -> None:
        from moe.quant.storage import quantized_state

        tensors, entries = quantized_state({}, solved)
        _atomic_save(tensors, self._block_path(layer_idx),
                     {"tensors": json.dumps(entries), "spec": json.dumps(spec.to_dict())})

    def finished(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _atomic_save(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _apply(model_state: dict, solved: dict) -> None:
    """Write the dequantized weights of ``solved`` into the model (through its state dict)."""
    from moe.quant.calibrate import Target, set_target_weight

    for param, result in solved.items():
        parts = result if isinstance(result, list) else [result]
        for e, part in enumerate(parts):
            set_target_weight(model_state, Target(param, e if isinstance(result, list) else None, ""), part.dequantize())


def _collect(solved: dict, targets, results, num_experts: int) -> None:
    for target, result in zip(targets, results):
        if target.expert is None:
            solved[target.param] = result
        else:
            solved.setdefault(target.param, [None] * num_experts)[target.expert] = result


@dataclass
class QuantizeResult:
    out: str
    label: str
    wall_s: float
    ray_tasks: int
    calibration_sigma: Optional[float]
    resumed_blocks: int = 0
    device: str = "cpu"
    """Where the calibration passes ran."""


def quantize_model(
    model_path: str,
    out: str,
    options: QuantizeOptions,
    ray_address: Optional[str] = None,
    ray_cpus: Optional[int] = None,
    data: Optional[str] = None,
    overwrite: bool = False,
    calibration: Optional[torch.Tensor] = None,
    progress: bool = True,
    device: Optional[str] = None,
) -> QuantizeResult:
    """Quantize the export at ``model_path`` into ``out`` (see the module docstring).

    ``calibration``: token ids ``[n, L]`` to calibrate on instead of building the set (``moe
    quantize --compare`` builds each set once for all methods). ``device``: where the calibration
    passes run (:func:`calibration_device`; default: the cluster's GPUs when it has any).

    ``out`` apart from ``model_path`` (:func:`launch.export.check_output_apart`) is checked before
    anything is written. SIGTERM or SIGINT raise :class:`Stopped` (:func:`stop_on_signals`), the
    finished blocks kept in ``out/.partial`` for the same call to resume."""
    from launch.export import check_output_apart

    check_output_apart(out, model_path, "--out", "--model")
    with stop_on_signals():
        return _quantize(model_path, out, options, ray_address, ray_cpus, data, overwrite, calibration, progress,
                         device)


def _quantize(model_path: str, out: str, options: QuantizeOptions, ray_address, ray_cpus, data, overwrite: bool,
              calibration: Optional[torch.Tensor], progress: bool, device: Optional[str]) -> QuantizeResult:
    from moe import load_pretrained, set_active_experts
    from moe.pretrained import CONFIG_NAME, WEIGHTS_NAME, write_export
    from moe.quant import rtn
    from moe.quant.calibrate import all_targets, block_state, merge_hessians, stage_targets, target_weight
    from moe.quant.storage import QUANT_FORMAT, quantized_state

    start = time.perf_counter()
    target_dir = Path(out).expanduser()
    if (target_dir / CONFIG_NAME).exists() or (target_dir / WEIGHTS_NAME).exists():
        if not overwrite:
            raise UserError(f"{str(target_dir)!r} already holds an exported model; pass --overwrite to replace it")
    meta = _read_export_meta(model_path)
    if meta.get("quantization"):
        raise UserError(f"{model_path!r} is already quantized ({meta['quantization'].get('method')}); quantize the full-precision export")
    model = load_pretrained(model_path, device="cpu")  # the driver's copy; the tasks move blocks to the device
    if options.experts is not None:
        set_active_experts(model, options.experts)
    config = model.config
    spec = options.spec
    state = model.state_dict()  # shares storage with the model: writing it writes the model
    solved: dict = {}
    sigma = None
    tasks = 0
    resumed = 0

    if options.method == "rtn":
        for target in all_targets(config):
            _collect(solved, [target], [rtn(target_weight(state, target), spec)], config.moe.num_experts)
    else:
        # Ray first: a cluster that cannot be reached leaves nothing behind
        with ray_session(ray_address, ray_cpus) as ray, ExitStack() as stack:
            target_dir.mkdir(parents=True, exist_ok=True)
            job = Progress(target_dir, {**options.key(), **_model_identity(model_path)}, overwrite)
            cluster = Cluster(ray, calibration_device(ray, device))
            input_ids = job.load_calibration()
            if input_ids is None:
                input_ids = calibration if calibration is not None else make_calibration(model, meta, options, cluster, data, progress)
                job.save_calibration(input_ids)
            sigma = calibration_sigma(model, input_ids, cluster.device)
            parts = shard_slices(input_ids.shape[0], options.shards)
            hidden = [cluster.submit("_embed_task", state["embed.weight"], input_ids[part]) for part in parts]
            blocks = range(config.num_layers)
            if progress:
                from tqdm import tqdm

                blocks = tqdm(blocks, desc=f"quantize {options.label} w{options.bits}", unit="block", dynamic_ncols=True)
                stack.callback(blocks.close)  # closed before a stop's message, not at garbage collection
            for layer_idx in blocks:
                k = _layer_k(model, layer_idx)
                block_solved = job.load_block(layer_idx)
                if block_solved is None:
                    block_solved = {}
                    for stage in (1, 2):
                        targets = stage_targets(config, layer_idx, stage)
                        if not targets:
                            continue
                        block_ref = cluster.put(block_state(model, layer_idx))
                        captured = _gather(cluster, [
                            cluster.submit("_capture_task", config.to_dict(), layer_idx, block_ref, k, h, stage, options.agq)
                            for h in hidden], f"block {layer_idx} stage {stage} capture", False)
                        hessians = merge_hessians(captured)
                        refs = [cluster.submit("_solve_task", target_weight(state, t), hessians[t.hessian], spec,
                                               options.block_size, options.percdamp, options.act_order) for t in targets]
                        stage_solved: dict = {}
                        _collect(stage_solved, targets, _gather(cluster, refs, f"block {layer_idx} stage {stage} solve",
                                                                progress), config.moe.num_experts)
                        _apply(state, stage_solved)
                        block_solved.update(stage_solved)
                    job.save_block(layer_idx, block_solved, spec)
                else:
                    _apply(state, block_solved)
                    resumed += 1
                solved.update(block_solved)
                if layer_idx + 1 < config.num_layers:
                    block_ref = cluster.put(block_state(model, layer_idx))
                    hidden = [cluster.submit("_advance_task", config.to_dict(), layer_idx, block_ref, k, h) for h in hidden]
            tasks = cluster.tasks
    if options.method == "rtn":
        _apply(state, solved)
    wall = time.perf_counter() - start
    tensors, entries = quantized_state(model.state_dict(), solved)
    quantization = {
        "format": QUANT_FORMAT, "method": options.method, "label": options.label, "spec": spec.to_dict(),
        "options": asdict(options), "tensors": entries, "calibration_sigma": sigma, "ray_tasks": tasks,
        "calibration_device": cluster.device if options.method != "rtn" else None,
        "wall_s": round(wall, 3), "source": str(Path(model_path).expanduser().resolve()),
    }
    extra = {key: meta[key] for key in ("data", "source") if key in meta}
    write_export(model, tensors, target_dir, {**extra, "quantization": quantization})
    if options.method != "rtn":
        job.finished()
    return QuantizeResult(str(target_dir), options.label, wall, tasks, sigma, resumed,
                          cluster.device if options.method != "rtn" else "cpu")


def _model_identity(model_path: str) -> dict:
    """Which export a partial job belongs to: its path, and the size and time of its weights (a
    model exported again to the same path is a different model)."""
    from moe.pretrained import WEIGHTS_NAME

    weights = (Path(model_path) / WEIGHTS_NAME).stat()
    return {"model": str(Path(model_path).resolve()), "model_bytes": weights.st_size, "model_mtime_ns": weights.st_mtime_ns}


def _read_export_meta(model_path: str) -> dict:
    """An export's ``config.json``, its ``data`` entry with absolute paths (relative ones resolved
    against the model's run, :func:`launch.evaluate.recorded_data`, never the current directory)."""
    from launch.evaluate import recorded_data
    from moe.pretrained import CONFIG_NAME, WEIGHTS_NAME

    root = Path(model_path)
    if not (root / CONFIG_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
        raise UserError(f"{model_path!r} is not an exported model (expected {CONFIG_NAME} and {WEIGHTS_NAME}; "
                         f"`moe export CHECKPOINT OUT` makes one from a training checkpoint)")
    from moe.files import read_json

    meta = read_json(root / CONFIG_NAME, what="exported model's config")
    data = meta.get("data")
    meta["data"] = recorded_data(root, data if isinstance(data, dict) else None)
    return meta


# ------------------------------------------------------------------------------------------------
# --compare
# ------------------------------------------------------------------------------------------------

VARIANTS = (  # (directory name, method, calibration, agq)
    ("rtn", "rtn", "random", False),
    ("gptq", "gptq", "random", False),
    ("gptq-ebss", "gptq", "ebss", False),
    ("gptq-agq", "gptq", "random", True),
    ("gptq-ebss-agq", "gptq", "ebss", True),
)
COMPARE_COLUMNS = ("bits", "method", "val_loss", "perplexity", "ppl_vs_fp", "calibration_sigma", "wall_s", "ray_tasks",
                   "size_mb")


def compare(model_path: str, out: str, bits_list: list[int], base: QuantizeOptions, ray_address=None, ray_cpus=None,
            data=None, eval_batches: int = 32, eval_batch_size: int = 16, progress: bool = True,
            device: Optional[str] = None) -> dict:
    """Quantize ``model_path`` every way of :data:`VARIANTS` at each of ``bits_list`` and evaluate
    each on the validation split at the calibration k. Each calibration set is built once (and
    saved in ``OUT/calibration``); a variant already quantized in OUT is evaluated, not redone.
    ``out`` must lie apart from ``model_path``; SIGTERM or SIGINT raise :class:`Stopped`, what is
    finished kept in ``out`` for the same call to resume."""
    from launch.export import check_output_apart

    check_output_apart(out, model_path, "--out", "--model")
    with stop_on_signals():
        return _compare(model_path, out, bits_list, base, ray_address, ray_cpus, data, eval_batches, eval_batch_size,
                        progress, device)


def _compare(model_path: str, out: str, bits_list: list[int], base: QuantizeOptions, ray_address, ray_cpus, data,
             eval_batches: int, eval_batch_size: int, progress: bool, device: Optional[str]) -> dict:
    from launch.evaluate import evaluate_path
    from moe import load_pretrained, set_active_experts
    from moe.quant.storage import size_on_disk

    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    meta = _read_export_meta(model_path)
    model = load_pretrained(model_path, device="cpu")
    if base.experts is not None:
        set_active_experts(model, base.experts)
    k = [layer.active_experts for layer in _moe_layers(model)]
    wants_cpu = device is not None and device == "cpu"
    eval_device = "cuda" if torch.cuda.is_available() and not wants_cpu else "cpu"  # this process evaluates
    eval_args = dict(k=None, data=data, batches=eval_batches, batch_size=eval_batch_size, device=eval_device)
    fp = evaluate_path(model_path, **{**eval_args, "k": k[0] if len(set(k)) == 1 else None})
    rows = [{"bits": 32, "method": "FP", "val_loss": fp["loss"], "perplexity": fp["perplexity"], "ppl_vs_fp": 1.0,
             "calibration_sigma": None, "wall_s": None, "ray_tasks": None, "size_mb": size_on_disk(model_path) / 1e6}]
    sets: dict = {}
    with ray_session(ray_address, ray_cpus) as ray:
        device = calibration_device(ray, device)
        for calib in ("random", "ebss"):
            path = root / "calibration" / f"{calib}.safetensors"
            options = QuantizeOptions(**{**asdict(base), "calib": calib, "method": "gptq", "agq": False})
            if path.exists():
                from safetensors.torch import load_file

                ids = load_file(str(path))["input_ids"]
                seconds, tasks = None, 0
            else:
                cluster = Cluster(ray, device)
                start = time.perf_counter()
                ids = make_calibration(model, meta, options, cluster, data, progress)
                seconds, tasks = time.perf_counter() - start, cluster.tasks
                path.parent.mkdir(exist_ok=True)
                _atomic_save({"input_ids": ids.contiguous()}, path)
            sets[calib] = {"input_ids": ids, "sigma": calibration_sigma(model, ids, device), "seconds": seconds, "tasks": tasks,
                           "num_sequences": ids.shape[0], "seq_len": ids.shape[1]}
        for bits in bits_list:
            for name, method, calib, agq in VARIANTS:
                options = QuantizeOptions(**{**asdict(base), "bits": bits, "method": method, "calib": calib, "agq": agq})
                target = root / f"w{bits}-{name}"
                existing = _finished_options(target)
                if existing != asdict(options):
                    quantize_model(model_path, str(target), options, data=data, overwrite=True,
                                   calibration=sets[calib]["input_ids"], progress=progress, device=device)
                saved = json.loads((target / "config.json").read_text())["quantization"]
                wall, tasks = saved["wall_s"], saved["ray_tasks"]
                ev = evaluate_path(str(target), **{**eval_args, "k": k[0] if len(set(k)) == 1 else None})
                rows.append({"bits": bits, "method": options.label, "val_loss": ev["loss"], "perplexity": ev["perplexity"],
                             "ppl_vs_fp": ev["perplexity"] / fp["perplexity"],
                             "calibration_sigma": None if method == "rtn" else sets[calib]["sigma"],
                             "wall_s": wall, "ray_tasks": tasks, "size_mb": size_on_disk(target) / 1e6})
    report = {
        "model": str(model_path), "k": k, "rows": rows, "eval_tokens": fp["tokens"],
        "calibration_device": device, "eval_device": fp["device"],
        "calibration": {name: {key: value for key, value in s.items() if key != "input_ids"} for name, s in sets.items()},
        "settings": {key: value for key, value in asdict(base).items() if key not in ("bits", "method", "calib", "agq")},
    }
    write_compare(report, root)
    return report


def _finished_options(target: Path) -> Optional[dict]:
    try:
        return json.loads((target / "config.json").read_text())["quantization"]["options"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if not math.isinf(value) else "inf"
    return str(value)


def compare_table(report: dict) -> str:
    lines = ["| bits | method | val loss | perplexity | ppl / FP | calib sigma | wall s | Ray tasks | MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append("| " + " | ".join([
            "FP32" if row["bits"] == 32 else f"W{row['bits']}", row["method"], _fmt(row["val_loss"]),
            _fmt(row["perplexity"], 3), _fmt(row["ppl_vs_fp"], 3), _fmt(row["calibration_sigma"]),
            _fmt(row["wall_s"], 1), _fmt(row["ray_tasks"]), _fmt(row["size_mb"], 2)]) + " |")
    calibration = report["calibration"]
    notes = [f"Calibration sets at k={report['k'][0] if len(set(report['k'])) == 1 else report['k']}: "
             + "; ".join(f"{name}: {c['num_sequences']} x {c['seq_len']} tokens, expert-balance sigma {c['sigma']:.4f}"
                         + (f", built in {c['seconds']:.1f} s by {c['tasks']} Ray tasks" if c["seconds"] is not None else "")
                         for name, c in calibration.items()),
             f"Validation: {report['eval_tokens']:,} tokens of the model's validation split.",
             f"Devices: calibration passes on {report.get('calibration_device', 'cpu')}, evaluation on "
             f"{report.get('eval_device', 'cpu')}."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_compare(report: dict, root: Path) -> None:
    (root / "compare.json").write_text(json.dumps(report, indent=2))
    with open(root / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS)
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow({key: row[key] for key in COMPARE_COLUMNS})
    (root / "compare.md").write_text(f"# Quantization of {report['model']}\n\n" + compare_table(report))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="GPTQ / RTN weight quantization with EBSS and AGQ, over Ray")
    parser.add_argument("--model", required=True, help="an exported model folder (moe export)")
    parser.add_argument("--out", required=True, help="folder for the quantized export (with --compare: the report)")
    parser.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    parser.add_argument("--bits", default="4", help="weight bits, 2..8 (with --compare: a list, e.g. 3,4)")
    parser.add_argument("--group-size", type=int, default=-1, help="input columns per scale (default -1: per row)")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    parser.add_argument("--calib", choices=("random", "ebss"), default="random", help="calibration set")
    parser.add_argument("--agq", action="store_true", help="affinity-guided GPTQ: tokens weighted by their gates")
    parser.add_argument("--experts", type=int, default=None, help="active experts k while calibrating (default: as saved)")
    parser.add_argument("--num-sequences", type=int, default=None, help="calibration sequences (default: sized to the model)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence")
    parser.add_argument("--ebss-width", type=int, default=4, help="EBSS search width w (default 4)")
    parser.add_argument("--ebss-tau", type=float, default=1.2, help="EBSS balance weight tau (default 1.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=4, help="calibration shards, one Ray task each (default 4)")
    parser.add_argument("--data", default=None, help="corpus for random calibration and --compare's evaluation")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (HOST:PORT or ray://HOST:PORT; default: the job's cluster or a local one)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT's export or unfinished job")
    parser.add_argument("--compare", action="store_true",
                        help="quantize with RTN, GPTQ, GPTQ+EBSS, GPTQ+AGQ, GPTQ+EBSS+AGQ and tabulate val perplexity")
    parser.add_argument("--eval-batches", type=int, default=32, help="--compare: validation batches (default 32)")
    parser.add_argument("--device", default="auto",
                        help="where the calibration passes run: cpu, cuda, or auto (default: the GPUs of the Ray "
                             "cluster when it has any; each task holds a quarter of one)")
    parser.set_defaults(func=run)


def parse_bits(text: str, allow_list: bool) -> list[int]:
    try:
        bits = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        bits = []
    if not bits or (len(bits) > 1 and not allow_list):
        raise UserError(f"--bits {text!r} is invalid: expected an integer in 2..8" + (" or a list like 3,4" if allow_list else ""))
    return bits


def stopped_message(stop: Stopped, out: str, compare_report: bool = False) -> str:
    """The one line ``moe quantize`` prints when a signal stopped it: what is kept, how to resume."""
    if compare_report:
        return (f"stopped by {stop.name}; finished variants, calibration sets and blocks are kept in {out}, "
                f"run the same command again to resume")
    partial = Path(out).expanduser() / PARTIAL_DIR
    if (partial / "job.json").is_file():
        return (f"stopped by {stop.name}; finished blocks are kept in {Path(out) / PARTIAL_DIR}, run the same "
                f"command again to resume")
    return f"stopped by {stop.name} before any block was finished; run the same command again to start over"


def run(args: argparse.Namespace) -> int:
    bits = parse_bits(args.bits, args.compare)
    options = QuantizeOptions(
        method=args.method, bits=bits[0], group_size=args.group_size, symmetric=not args.asym, act_order=args.act_order,
        calib=args.calib, agq=args.agq, num_sequences=args.num_sequences, seq_len=args.seq_len,
        ebss_width=args.ebss_width, ebss_tau=args.ebss_tau, experts=args.experts, seed=args.seed, shards=args.shards,
    )
    for b in bits:
        QuantizeOptions(**{**asdict(options), "bits": b})
    try:
        if args.compare:
            report = compare(args.model, args.out, bits, options, args.ray_address, args.ray_cpus, args.data,
                             args.eval_batches, device=args.device)
        else:
            result = quantize_model(args.model, args.out, options, args.ray_address, args.ray_cpus, args.data,
                                    args.overwrite, device=args.device)
    except Stopped as stop:
        print(f"moe quantize: {stopped_message(stop, args.out, args.compare)}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    if args.compare:
        print(compare_table(report), end="")
        print(f"wrote {Path(args.out) / 'compare.md'}, compare.csv, compare.json")
        return 0
    sigma = "" if result.calibration_sigma is None else f", calibration sigma {result.calibration_sigma:.4f}"
    resumed = f", {result.resumed_blocks} blocks resumed from an earlier run" if result.resumed_blocks else ""
    print(f"quantized {args.model} -> {result.out}: {result.label} W{options.bits} in {result.wall_s:.1f} s, "
          f"{result.ray_tasks} Ray tasks on {result.device}{sigma}{resumed}")
    return 0
