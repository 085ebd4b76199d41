"""The per-rank training job: a MoE language model trained by a DeepSpeed engine on this rank.

Every way of starting ranks runs :func:`train` on each of them: ``python -m launch.train`` (one
process), the deepspeed launcher (``--module launch.train``, see :mod:`launch.train.launcher`) and
Ray Train's workers (:mod:`launch.train.ray`).

Each optimizer step: the k schedule moves to the step's k, every micro-batch's loss gets the MoE
auxiliary losses added, DeepSpeed steps (AdamW, warmup + cosine LR, clipping, ZeRO), and then the
expert biases move once, from token counts summed over all data-parallel ranks.

Outputs under ``out_dir``: ``checkpoints/`` (DeepSpeed checkpoints; ``latest`` names the newest
complete one), ``metrics.jsonl``, ``tensorboard/`` and ``config.yaml`` (the resolved config).
SIGINT or SIGTERM stops the run at the end of the current step with a checkpoint; a second save
interrupted half-way never replaces the last complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from launch.config import RunConfig
from moe.errors import UserError

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``out_dir``, ``data.path`` and ``data.cache_dir`` made absolute (relative ones
    are relative to the directory training starts in, which every rank shares): the run config
    saved with each checkpoint then names the same folders from wherever it is read."""
    def absolute(value):
        return None if value is None else str(Path(value).expanduser().resolve())

    data = dataclasses.replace(cfg.data, path=absolute(cfg.data.path), cache_dir=absolute(cfg.data.cache_dir))
    return dataclasses.replace(cfg, out_dir=absolute(cfg.out_dir), data=data)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_out_dir(cfg: RunConfig, resume: bool, resume_from: Optional[str] = None, checksums: bool = True,
                  log=None) -> Optional[str]:
    """The tag to resume from (None for a fresh run); a :class:`UserError` if the request does not fit
    what is on disk: resuming with no intact checkpoint, a fresh run into an out_dir that holds
    checkpoints or another run's logs, or a checkpoint of another model shape.

    Resuming takes ``resume_from`` or else the newest intact checkpoint, whatever ``latest`` says; a
    corrupted checkpoint is skipped for the one before it, and ``log`` is told so."""
    from parallel.checkpoint import check_same_model, checkpoint_tags, find_checkpoint, latest_tag, read_run_config

    root = Path(cfg.out_dir) / CHECKPOINTS
    if resume or resume_from is not None:
        tag, skipped = find_checkpoint(root, resume_from, checksums)
        for line in skipped:
            (log or _stderr)(line)
        if tag is None:
            detail = f" ({'; '.join(skipped)})" if skipped else ""
            raise UserError(f"--resume: no complete checkpoint in {str(root)!r}{detail}")
        check_same_model(read_run_config(root, tag)["model"], cfg.model.to_dict(), f"checkpoint {str(root / tag)!r}")
        return tag
    tags = checkpoint_tags(root)
    if tags:
        raise UserError(
            f"out_dir {cfg.out_dir!r} already holds checkpoint {latest_tag(root) or tags[-1]}; pass --resume to "
            "continue it or --set out_dir=... to start another run"
        )
    metrics = Path(cfg.out_dir) / METRICS
    if metrics.is_file() and any('"event": "train"' in line for line in metrics.read_text(errors="replace").splitlines()):
        raise UserError(f"out_dir {cfg.out_dir!r} already holds the logs of another run ({metrics.name}); "
                        "--set out_dir=... to start another run")
    return None


def check_checkpoint_folder(cfg: RunConfig, folder: Path, checksums: bool = True) -> tuple[Path, str]:
    """(root, tag) of the checkpoint in ``folder`` (any folder holding one checkpoint, e.g. a copy
    published outside out_dir), after checking that it is complete, intact (sizes, and with
    ``checksums`` every file's SHA-256) and of this config's model shape; else a :class:`UserError`."""
    from parallel.checkpoint import check_same_model, find_checkpoint, read_run_config

    folder = Path(folder)
    root, tag = folder.parent, folder.name
    find_checkpoint(root, tag, checksums)
    check_same_model(read_run_config(root, tag)["model"], cfg.model.to_dict(), f"checkpoint {str(folder)!r}")
    return root, tag


def _end_step(cfg: RunConfig, until_step: Optional[int]) -> int:
    if until_step is None:
        return cfg.train.steps
    if not 1 <= until_step <= cfg.train.steps:
        raise UserError(f"--until-step {until_step} is invalid: expected 1..{cfg.train.steps} (train.steps)")
    return until_step


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the ranks agree on at the end of each step.

    Only a job on its process's main thread listens: Ray Train runs the job on a thread of its
    worker, where the flag stays down (stopping a Ray run is the driver's business)."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self) -> int:
        from moe.devices import collective_device

        flag = torch.tensor([self.signum], dtype=torch.int64, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Logs:
    """Rank 0's outputs: a tqdm bar, TensorBoard scalars and a JSONL file. Other ranks: nothing."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out_dir / METRICS
        _truncate_jsonl(self.jsonl_path, start_step)  # records past the resumed step are from a lost future
        self.jsonl = self.jsonl_path.open("a")
        self.tensorboard_dir = out_dir / TENSORBOARD
        self.tensorboard = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step or None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def record(self, event: str, step: int, scalars: dict, extra: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"event": event, "step": step, "time": time.time(), **scalars, **(extra or {})}) + "\n")
        self.jsonl.flush()

    def advance(self, postfix: Optional[dict] = None) -> None:
        if self.enabled:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tensorboard.close()
            self.jsonl.close()


def _truncate_jsonl(path: Path, start_step: int) -> None:
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= start_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _set_cpu_threads() -> None:
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def train(cfg: RunConfig, resume: bool = False, until_step: Optional[int] = None, resume_from: Optional[str] = None,
          lock_held: bool = False, resume_source: Optional[Path] = None,
          after_save: Optional[Callable[[int, Path], None]] = None) -> int:
    """Run (or resume) the job described by ``cfg`` on this rank; returns the exit status (0 when
    all steps, or those up to ``until_step``, ran; 128 + signal number when stopped by SIGINT or
    SIGTERM after saving).

    ``resume`` continues the newest intact checkpoint (each file checked against the checkpoint's
    manifest, a corrupted checkpoint skipped for the one before it); ``resume_from`` continues that
    tag, whose files ``moe train`` has already checked (only their sizes are checked again here).
    ``resume_source`` continues the checkpoint in that folder instead, wherever it is (Ray Train's
    published copy after a restart: :mod:`launch.train.ray`); it is checked like ``resume``'s.
    Rank 0 holds the run folder's lock unless ``lock_held`` or ``moe train`` holds it for the ranks.

    ``after_save(step, folder)`` is called on every rank after each complete checkpoint (its
    manifest written, ``latest`` pointing at it)."""
    from launch.joblock import JobLock, held_for_me

    rank = int(os.environ.get("RANK", "0"))
    lock = None
    if rank == 0 and not lock_held and not held_for_me():
        lock = JobLock(cfg.out_dir).acquire()
    try:
        return _train(cfg, resume, until_step, resume_from, resume_source, after_save)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, resume: bool, until_step: Optional[int], resume_from: Optional[str],
           resume_source: Optional[Path] = None, after_save: Optional[Callable[[int, Path], None]] = None) -> int:
    import uuid

    import yaml

    from launch.data import BatchSampler, check_training_data, prepare_corpus, validation_windows
    from launch.evaluate import evaluate, format_loss
    from moe import (
        LoadMeter,
        MoETransformer,
        advance_k_schedule,
        collect_aux_losses,
        max_violation,
        moe_layers,
        update_expert_biases,
    )
    from parallel import checkpoint
    from parallel.engine import build_engine, init_distributed
    from parallel.expert_parallel import apply_expert_parallel, exchange_stats
    from parallel.groups import expert_parallel_groups

    # DeepSpeed's ZeRO calls a torch collective that torch has renamed; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    log = _stderr if int(os.environ.get("RANK", "0")) == 0 else (lambda line: None)
    out_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / CHECKPOINTS
    # the same answer on every rank: it only reads the disk
    if resume_source is not None:
        resume_root, resume_tag = check_checkpoint_folder(cfg, resume_source,
                                                          checksums=int(os.environ.get("RANK", "0")) == 0)
    else:
        resume_root = ckpt_root
        resume_tag = check_out_dir(cfg, resume, resume_from, checksums=resume_from is None, log=log)
    end_step = _end_step(cfg, until_step)
    rank, world_size = init_distributed()
    _set_cpu_threads()
    t = cfg.train
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    if rank == 0:  # the corpus is tokenised once; the other ranks then map the cached files
        splits = prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.data.val_permille)
    dist.barrier()
    if rank != 0:
        splits = prepare_corpus(cfg.data.path, cfg.data.cache_dir, cfg.data.val_permille)
    # `moe train` checked this before starting the ranks; a launch without it is checked here, on every rank
    check_training_data(splits, t.seq_len, t.micro_batch_size, world_size, validate=bool(t.eval_every))

    model = MoETransformer(cfg.model)  # same seed on every rank: identical weights and routers
    if t.init is not None and resume_tag is None and resume_source is None:  # a fresh run from an export
        _load_init(model, t.init)
    if t.compile:  # each block through torch.compile; parameter names and checkpoints unchanged
        from moe import compile_blocks

        compile_blocks(model)
    ep_size = cfg.parallel.expert_parallel_size
    ep_group = None
    if ep_size > 1:  # keep this rank's slice of the experts; tokens travel by all-to-all
        ep_groups = expert_parallel_groups(ep_size)
        apply_expert_parallel(model, ep_groups)
        ep_group = ep_groups.group
    zero_stage = (cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0)
    # Plain data parallelism (ZeRO-0) with sharded experts: DeepSpeed's clipping averages each
    # rank's own norm, which is not the global norm; the trainer clips by the exact one instead.
    own_clipping = zero_stage == 0 and ep_size > 1 and t.grad_clip > 0
    engine = build_engine(model, cfg.deepspeed, dataclasses.replace(t, grad_clip=0.0) if own_clipping else t)
    device = engine.device
    sampler = BatchSampler(splits.train, t.seq_len, t.micro_batch_size, rank, world_size, t.seed)
    start_step = 0
    run_id = [uuid.uuid4().hex]  # the run's id, which its checkpoints carry: pruning keeps to its own
    logs_note = None
    if resume_tag is not None:
        state = checkpoint.load(engine, resume_root, resume_tag)
        start_step = int(state["step"])
        run_id = [state.get("run_id") or run_id[0]]
        logs_note = f"resuming from checkpoint {resume_root / resume_tag} (step {start_step})"
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng_state"])
        if start_step >= end_step:
            if rank == 0:
                print(f"checkpoint {resume_tag} is already at step {start_step} (asked to train to {end_step}): nothing to do")
            return 0
    dist.broadcast_object_list(run_id, src=0)  # rank 0's, everywhere
    run_id = run_id[0]

    run_dict = cfg.to_dict()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(run_dict, sort_keys=False))
    logs = _Logs(out_dir, rank == 0, start_step, t.steps)
    layers = dict(moe_layers(model))
    meter = LoadMeter(model)
    stop = _StopRequest()
    group = dist.group.WORLD
    tokens_per_step = world_size * t.micro_batch_size * t.grad_accum * t.seq_len
    peak_flops = _peak_flops(device, world_size)  # all ranks together; None on CPU or an unknown GPU
    logs.write(
        f"training {model.num_parameters():,} parameters on {world_size} rank(s) ({device}), "
        f"{tokens_per_step:,} tokens per step, steps {start_step}..{end_step} of {t.steps}, out_dir {out_dir}"
    )
    logs.write(f"data: {splits.split_note}")
    if logs_note:
        logs.write(logs_note)

    windows = validation_windows(splits.val, cfg.data.val_seq_len, cfg.data.val_tokens) if t.eval_every else None
    if windows is not None:
        logs.write(f"validation: {windows.describe()}")

    def run_validation(step: int) -> dict:
        result = evaluate(model, splits.val, windows, t.micro_batch_size, rank, world_size)
        if ep_size > 1:
            exchange_stats(model)  # validation's exchanges are not training traffic
        logs.record("eval", step, {"val/loss": result["loss"], "val/loss_stderr": result["loss_stderr"],
                                   "val/perplexity": result["perplexity"], "val/max_vio": result["max_vio"]},
                    {"val_tokens": result["tokens"], "val_windows": result["windows"]})
        logs.write(f"step {step}: val loss {format_loss(result['loss'], result['loss_stderr'])}, perplexity {result['perplexity']:.2f}, "
                   f"MaxVio {result['max_vio']:.3f} over {result['tokens']:,} tokens")
        return result

    def save(step: int) -> None:
        client_state = {"step": step, "run_id": run_id, "sampler": sampler.state_dict(), "torch_rng_state": torch.get_rng_state(),
                        "active_experts": [layer.active_experts for layer in layers.values()],
                        "layout": checkpoint.current_layout(engine)}
        tag = checkpoint.save(engine, ckpt_root, step, client_state, run_dict, keep=t.keep_checkpoints)
        logs.write(f"step {step}: checkpoint {ckpt_root / tag}")
        if after_save is not None:
            after_save(step, ckpt_root / tag)

    status = 0
    window = _new_window(device)
    try:
        if start_step == 0 and t.eval_every:
            run_validation(0)
        for step in range(start_step, end_step):
            step_start = time.perf_counter()
            ks = advance_k_schedule(model, step)
            for _ in range(t.grad_accum):
                inputs, labels = next(sampler)
                _, loss = engine(inputs.to(device), labels=labels.to(device))
                aux = collect_aux_losses(model)
                engine.backward(loss if aux is None else loss + aux)
                if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
                    # DeepSpeed's plain path does not keep the norm; the gradients are already
                    # reduced over ranks here, so this is the global pre-clip norm.
                    window["grad_norm"] = _grad_norm(model, ep_group)
                    if own_clipping:
                        _clip_gradients(model, window["grad_norm"], t.grad_clip)
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
                meter.update()
                window["sums"][0] += loss.detach().double()  # kept on the device: no sync per micro-batch
                if aux is not None:
                    window["sums"][1] += aux.detach().double()
                window["micro"] += 1
            update_expert_biases(model, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize()  # honest step times (routing syncs every layer anyway)
            window["seconds"] += time.perf_counter() - step_start
            window["steps"] += 1
            window["model_flops"] += tokens_per_step * train_flops_per_token(model, t.seq_len)
            done = step + 1
            last = done == end_step
            postfix = None
            if done % t.log_every == 0 or last:
                postfix = _log_train(logs, engine, window, meter, layers, ks, done, tokens_per_step, max_violation,
                                     ep_size, peak_flops)
            if t.eval_every and (done % t.eval_every == 0 or last):
                run_validation(done)
            signum = stop.agreed()
            if done % t.save_every == 0 or last or signum:
                save(done)
            logs.advance(postfix)
            if signum:
                logs.write(f"stopped by {signal.Signals(signum).name} after step {done}; "
                           f"resume with --resume (checkpoint {ckpt_root / checkpoint.tag_for_step(done)})")
                status = 128 + signum
                break
    finally:
        stop.restore()
        logs.close()
    if rank == 0 and status == 0:
        _print_summary(cfg, out_dir, start_step, end_step, world_size, peak_flops)
    return status


def _load_init(model, path: str) -> None:
    """The weights of the export at ``path`` (its model section is the run's: launch.config), into
    ``model`` on the CPU, before anything is sliced or cast."""
    from moe import load_pretrained

    source = load_pretrained(path, device="cpu")
    model.load_state_dict(source.state_dict(), strict=True)  # fixed random gates and expert biases included


def _grad_norm(model: torch.nn.Module, ep_group=None) -> float:
    """The global L2 norm of the gradients: replicated parameters once, expert shards (marked
    ``allreduce=False``) summed over the expert-parallel group."""
    from moe.devices import collective_device
    from parallel.expert_parallel import is_expert_parameter

    device = next(model.parameters()).device
    squares = torch.zeros(2, dtype=torch.float64, device=device)  # [replicated, expert shards], one sync at the end
    for param in model.parameters():
        if param.grad is not None:
            squares[int(is_expert_parameter(param))] += param.grad.detach().float().square().sum()
    if ep_group is not None:
        squares = squares.to(collective_device(ep_group))
        dist.all_reduce(squares[1:], group=ep_group)
    return float(squares.sum().sqrt())


def _clip_gradients(model: torch.nn.Module, norm: float, max_norm: float) -> None:
    coef = min(1.0, max_norm / (norm + 1e-6))  # DeepSpeed's and torch's rule
    if coef < 1.0:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(coef)


def _new_window(device) -> dict:
    """Sums over the steps since the last log record: [loss, aux loss, micro-batches, dropped, assignments]."""
    return {"sums": torch.zeros(5, dtype=torch.float64, device=device), "micro": 0, "seconds": 0.0, "steps": 0,
            "model_flops": 0.0}


def train_flops_per_token(model, seq_len: int) -> int:
    """Model FLOPs of training on one token (forward + backward = 3 forwards): the matmuls of the
    active parameters at each layer's current k, and attention over the whole sequence (PaLM's
    convention, 12 * layers * d * seq_len for forward and backward; causal masking is not subtracted)."""
    return 3 * model.flops_per_token(context=seq_len)


def _peak_flops(device: torch.device, world_size: int) -> Optional[float]:
    """The ranks' summed peak dense bf16 FLOP/s (MFU's denominator), or None off CUDA or for a GPU
    the peaks table (``moe.devices.DENSE_BF16_PEAK_FLOPS``) does not know."""
    from moe.devices import dense_bf16_peak_flops

    if device.type != "cuda":
        return None
    peak = dense_bf16_peak_flops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * world_size


def _log_train(logs, engine, window, meter, layers, ks, step, tokens_per_step, max_violation, ep_size=1,
               peak_flops: Optional[float] = None) -> dict:
    """Reduce the window's loss and load over ranks and record them; returns the progress-bar fields."""
    from moe.devices import collective_device

    elapsed = window["seconds"]  # training steps only: validation and checkpoints are not counted
    device = collective_device()  # CUDA under NCCL, CPU under gloo
    loads = meter.stacked_load().to(device)  # [L, E] assignments per expert in this window
    sums = window["sums"].to(device, copy=True)
    sums[2:] = torch.tensor([window["micro"], meter.dropped, meter.assignments], dtype=torch.float64, device=device)
    dist.all_reduce(loads)
    dist.all_reduce(sums)
    loads, sums = loads.cpu(), sums.cpu()  # one host copy each for the logs
    layer_loads = meter.per_layer(loads)  # name -> [E] (layers may differ in E)
    loss, aux = float(sums[0] / sums[2]), float(sums[1] / sums[2])
    max_vio = {name: max_violation(load) for name, load in layer_loads.items()}
    mean_vio = sum(max_vio.values()) / len(max_vio)
    tokens_per_s = tokens_per_step * window["steps"] / max(elapsed, 1e-9)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = window.get("grad_norm")
    scalars = {
        "train/loss": loss,
        "train/aux_loss": aux,
        "train/lr": float(engine.get_lr()[0]),
        "train/tokens_per_s": tokens_per_s,
        "train/k": float(ks[0]),
        "train/max_vio": mean_vio,
        "train/dropped_fraction": float(sums[3] / max(1.0, float(sums[4]))),
    }
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    if peak_flops:
        scalars["train/mfu"] = window["model_flops"] / max(elapsed, 1e-9) / peak_flops
    for i, (name, load) in enumerate(layer_loads.items()):
        scalars[f"max_vio/{name}"] = max_vio[name]
        scalars[f"k/{name}"] = float(ks[i])
        bias = layers[name].router.expert_bias
        if bias is not None:  # how far the balancing bias has moved: max - min over experts
            scalars[f"bias_range/{name}"] = float(bias.max() - bias.min())
        share = load / load.sum().clamp_min(1)
        for expert, value in enumerate(share.tolist()):
            scalars[f"load/{name}/expert_{expert:03d}"] = value
    postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}", "k": ks[0], "MaxVio": f"{mean_vio:.2f}"}
    if "train/mfu" in scalars:
        postfix["MFU"] = f"{100 * scalars['train/mfu']:.1f}%"
    if ep_size > 1:
        a2a_share = _log_expert_parallel(scalars, engine.module, layer_loads, ep_size, window["steps"], elapsed)
        postfix["a2a"] = f"{100 * a2a_share:.0f}%"
    logs.record("train", step, scalars)
    window.update(_new_window(window["sums"].device))
    meter.reset()
    return postfix


def _log_expert_parallel(scalars: dict, model, loads: dict, ep_size: int, steps: int, elapsed: float) -> float:
    """Per-rank exchange volume and all-to-all time, and each expert-parallel rank's share of the
    load, into ``scalars``; returns the mean share of step time spent in all-to-all."""
    from moe.devices import collective_device
    from parallel.expert_parallel import exchange_stats

    stats = exchange_stats(model)  # this rank's, since the last record
    mine = torch.tensor([stats["rows_sent"], stats["rows_received"], stats["bytes_sent"], stats["seconds"], elapsed],
                        dtype=torch.float64, device=collective_device())
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    shares = []
    for rank, (sent, received, sent_bytes, seconds, rank_elapsed) in enumerate(t.tolist() for t in every):
        scalars[f"ep/rank{rank}/rows_sent_per_step"] = sent / max(1, steps)
        scalars[f"ep/rank{rank}/rows_received_per_step"] = received / max(1, steps)
        scalars[f"ep/rank{rank}/bytes_sent_per_step"] = sent_bytes / max(1, steps)
        scalars[f"ep/rank{rank}/all_to_all_share"] = seconds / max(rank_elapsed, 1e-9)
        shares.append(seconds / max(rank_elapsed, 1e-9))
    per_rank = torch.stack([load.view(ep_size, -1).sum(-1) for load in loads.values()])  # [L, P] each rank's experts' load
    per_rank = (per_rank / per_rank.sum(-1, keepdim=True).clamp_min(1)).mean(0)
    for rank, share in enumerate(per_rank.tolist()):
        scalars[f"ep/expert_rank{rank}/load_share"] = share
    scalars["train/all_to_all_share"] = sum(shares) / len(shares)
    return scalars["train/all_to_all_share"]


def _print_summary(cfg: RunConfig, out_dir: Path, start_step: int, end_step: int, world_size: int,
                   peak_flops: Optional[float] = None) -> None:
    from parallel.checkpoint import latest_tag

    records = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines() if line]
    speeds = [r["train/tokens_per_s"] for r in records if r["event"] == "train" and r["step"] > start_step]
    if end_step == cfg.train.steps:
        print(f"done: steps {start_step}..{end_step} on {world_size} rank(s)")
    else:
        print(f"paused after step {end_step} of {cfg.train.steps}; continue with --resume")
    evals = [r for r in records if r["event"] == "eval"]
    if evals:
        print(f"val loss: {evals[0]['val/loss']:.4f} at step {evals[0]['step']} -> "
              f"{evals[-1]['val/loss']:.4f} at step {evals[-1]['step']}")
    if speeds:
        print(f"training tokens/s (all ranks): median {sorted(speeds)[len(speeds) // 2]:,.0f} over {len(speeds)} log windows")
    mfus = [r["train/mfu"] for r in records if r["event"] == "train" and r["step"] > start_step and "train/mfu" in r]
    if mfus:
        print(f"MFU: median {100 * sorted(mfus)[len(mfus) // 2]:.1f}% over {len(mfus)} log windows (model FLOPs / "
              f"peak dense bf16 of {world_size} x {torch.cuda.get_device_name()}, {peak_flops / world_size / 1e12:.1f} "
              "TFLOP/s each)")
    elif peak_flops is None and torch.cuda.is_available():
        print(f"MFU: not reported: no peak FLOP/s known for {torch.cuda.get_device_name()} (set SLIMMOE_PEAK_TFLOPS)")
    print(f"checkpoint:  {out_dir / CHECKPOINTS / (latest_tag(out_dir / CHECKPOINTS) or '')}")
    print(f"metrics:     {out_dir / METRICS}")
    print(f"tensorboard: {out_dir / TENSORBOARD}  (tensorboard --logdir {out_dir / TENSORBOARD})")
