"""One quantization job of ``moe quantize``: its options, its calibration set, and block by block
the Hessians, the GPTQ solves and the resumable progress in ``OUT/.partial``."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from launch.quantize.cluster import Cluster, calibration_device, ray_session, stop_on_signals
from moe.errors import UserError

PARTIAL_DIR = ".partial"

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
    experts: Optional[Union[int, list[int]]] = None
    """Active experts k while calibrating (default: the k saved with the model), or a list of
    distinct ks: the calibration passes run at each and their Hessians are summed (a
    self-slimmable model served at several ks; :func:`calibration_runs`)."""
    eora: int = 0
    """EoRA rank: a rank-r correction B A per quantized linear (not the router) from its GPTQ
    Hessian, stored with the export (:mod:`moe.quant.eora`); 0: none."""
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
        for name, value in {**positive, "num_sequences": self.num_sequences, "seq_len": self.seq_len}.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"--{name.replace('_', '-')} {value!r} is invalid: expected an integer >= 1")
        if self.experts is not None:
            check_ks(self.experts)
        if isinstance(self.eora, bool) or not isinstance(self.eora, int) or self.eora < 0:
            raise UserError(f"--eora {self.eora!r} is invalid: expected a rank >= 1 (or 0 for none)")
        if not self.ebss_tau > 0 or not 0 <= self.percdamp:
            raise UserError(f"--ebss-tau {self.ebss_tau} must be > 0 and --percdamp {self.percdamp} >= 0")
        if self.method == "rtn" and self.agq:
            raise UserError("--agq weights GPTQ's Hessians by the gates; it needs --method gptq")
        if self.method == "rtn" and self.eora:
            raise UserError("--eora needs each linear's calibration activations; it needs --method gptq")

    @property
    def ks(self) -> Optional[list[int]]:
        """The calibration ks as a list (None: the k saved with the model)."""
        if self.experts is None:
            return None
        return [self.experts] if isinstance(self.experts, int) else list(self.experts)

    @property
    def spec(self):
        from moe.quant import QuantSpec

        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def label(self) -> str:
        if self.method == "rtn":
            return "RTN"
        return ("GPTQ" + (" + EBSS" if self.calib == "ebss" else "") + (" + AGQ" if self.agq else "")
                + (f" + EoRA r{self.eora}" if self.eora else ""))

    def key(self) -> dict:
        """The settings a partial job must share to be resumed."""
        values = asdict(self)
        if not self.eora:  # as before EoRA existed: older partial jobs still resume
            values.pop("eora")
        if self.method == "rtn":  # nothing about calibration matters
            for name in ("calib", "agq", "num_sequences", "seq_len", "ebss_width", "ebss_tau", "seed", "shards",
                         "block_size", "percdamp", "act_order"):
                values.pop(name)
        return values


def check_ks(experts, num_experts: Optional[int] = None) -> list[int]:
    """``--experts`` as a list of ks: one integer, or a non-empty list of distinct integers, each in
    1..``num_experts`` (the model's largest E, when known). Anything else is one :class:`UserError`."""
    ks = [experts] if isinstance(experts, int) and not isinstance(experts, bool) else experts
    shown = ",".join(map(str, ks)) if isinstance(ks, (list, tuple)) else repr(experts)
    if not isinstance(ks, (list, tuple)) or not ks:
        raise UserError(f"--experts {shown or repr(experts)} is invalid: expected a k or a list of ks like 2,4,8, got "
                        f"{'an empty list' if isinstance(ks, (list, tuple)) else type(experts).__name__}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"--experts {shown} is invalid: k={k!r} is not an integer >= 1")
        if num_experts is not None and k > num_experts:
            raise UserError(f"--experts {shown} is invalid: k={k} is outside 1..{num_experts} (the model's number of experts)")
    repeated = sorted({k for k in ks if ks.count(k) > 1})
    if repeated:
        raise UserError(f"--experts {shown} is invalid: k={repeated[0]} is listed twice (the ks must differ)")
    return list(ks)


def parse_experts(text: str) -> Optional[Union[int, list[int]]]:
    """``--experts`` from the command line: ``"4"`` -> 4 (one k, as always), ``"2,4,8"`` -> [2, 4, 8];
    checked by :func:`check_ks` (empty, not integers, below 1, repeated: a :class:`UserError`)."""
    if text is None:
        return None
    parts = [part.strip() for part in str(text).split(",")]
    try:
        ks = [int(part) for part in parts if part]
    except ValueError:
        raise UserError(f"--experts {text!r} is invalid: expected a k or a comma-separated list of ks like 2,4,8") from None
    if not ks:
        raise UserError(f"--experts {text!r} is invalid: expected a k or a list of ks like 2,4,8, got an empty list")
    check_ks(ks)
    return ks[0] if len(ks) == 1 else ks


def calibration_runs(model, options: QuantizeOptions) -> list[list[int]]:
    """The ks the calibration passes run at, one list of per-MoE-layer ks for each (as
    :func:`moe.set_active_experts` takes them; a k above a smaller layer's E is that layer's E).

    None or one k: a single pass at the model's current ks (``quantize_model`` has set them).
    Several ks: one pass each; every block's Hessians (GPTQ's ``sum x x^T``, AGQ's gate-weighted
    ``sum c x x^T``) are the sums over the passes, each pass running the already-quantized blocks
    at its own k, so GPTQ minimises the summed output error over the deployments. A k above the
    model's largest E is a :class:`UserError`."""
    layers = _moe_layers(model)
    current = [layer.active_experts for layer in layers]
    if options.experts is None or isinstance(options.experts, int):
        return [current]
    ks = check_ks(options.experts, max(layer.num_experts for layer in layers))
    return [[min(k, layer.num_experts) for layer in layers] for k in ks]


def _block_ks(model, run: list[int]) -> list[int]:
    """Per block (dense blocks: 1) the k of a calibration pass ``run`` (per MoE layer)."""
    moe_k = iter(run)
    return [next(moe_k) if getattr(block.ffn, "active_experts", None) is not None else 1 for block in model.blocks]


def check_eora_rank(config, state: dict, rank: int) -> None:
    """``--eora RANK``: a :class:`UserError` unless 1 <= RANK <= min(out, in) of every linear it
    corrects (:func:`moe.quant.calibrate.eora_target`)."""
    from moe.quant.calibrate import all_targets, eora_target, target_weight
    from moe.quant.eora import check_rank

    shapes = {(t.param, t.expert is not None): target_weight(state, t).shape for t in all_targets(config)
              if eora_target(t) and t.expert in (None, 0)}
    (param, _), (out_features, in_features) = min(shapes.items(), key=lambda item: min(item[1]))
    check_rank(rank, out_features, in_features, param)


# ------------------------------------------------------------------------------------------------
# Calibration sets
# ------------------------------------------------------------------------------------------------


def calibration_size(model, options: QuantizeOptions) -> tuple[int, int]:
    """``(num_sequences, seq_len)``: the options' or :func:`moe.quant.default_calibration_size`'s,
    sized for the smallest calibration k (the one whose experts see the fewest tokens)."""
    from moe import set_active_experts
    from moe.quant import default_calibration_size

    runs = calibration_runs(model, options)
    saved = [layer.active_experts for layer in _moe_layers(model)]
    set_active_experts(model, min(runs, key=lambda run: run[0]))
    try:
        num_sequences, seq_len = default_calibration_size(model)
    finally:
        set_active_experts(model, saved)
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
    runs = calibration_runs(model, options)
    ks = runs if len(runs) > 1 else None  # several ks: the search balances at each (moe.quant.ebss_search)
    refs = [cluster.submit("_ebss_task", config, state, k, first[part], seq_len, options.ebss_width, options.ebss_tau, ks)
            for part in shard_slices(num_sequences, options.shards)]
    return torch.cat(_gather(cluster, refs, "EBSS", progress))


def calibration_sigma(model, input_ids: torch.Tensor, device: str = "cpu", runs: Optional[list] = None) -> float:
    """MoEQuant's expert-balance sigma of the calibration set under ``model``'s routing, measured on
    ``device`` (a copy of the model goes there; the caller's stays where it is). ``runs``: several
    calibration ks (:func:`calibration_runs`): the mean of the sigma at each, as EBSS scores them."""
    import copy

    from moe import moe_layers, set_active_experts
    from moe.quant import expert_balance_sigma, expert_usage

    runner = model if torch.device(device) == next(model.parameters()).device else copy.deepcopy(model).to(device)
    widths = [layer.num_experts for _, layer in moe_layers(runner)]
    if runs is None or len(runs) < 2:
        return float(expert_balance_sigma(expert_usage(runner, input_ids), widths))
    saved = [layer.active_experts for _, layer in moe_layers(runner)]
    sigmas = []
    try:
        for run in runs:
            set_active_experts(runner, run)
            sigmas.append(float(expert_balance_sigma(expert_usage(runner, input_ids), widths)))
    finally:
        set_active_experts(runner, saved)
    return sum(sigmas) / len(sigmas)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def _state(model) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _moe_layers(model):
    from moe import moe_layers

    return [layer for _, layer in moe_layers(model)]


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
        from moe.quant import LowRankCorrection, QuantizedWeight, QuantSpec, unpack_codes

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
                if entry.get("eora_rank"):
                    a, b = tensors[f"{param}.eora_a"], tensors[f"{param}.eora_b"]
                    eora = [LowRankCorrection(*ab) for ab in zip(a, b)] if entry["experts"] else LowRankCorrection(a, b)
                else:
                    eora = [None] * len(codes) if entry["experts"] else None
                if entry["experts"]:
                    solved[param] = [QuantizedWeight(c, s, z, spec, e) for c, s, z, e in zip(codes, scales, zeros, eora)]
                else:
                    solved[param] = QuantizedWeight(codes, scales, zeros, spec, eora)
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
    """Write the weights ``solved`` serves with (dequantized, plus any EoRA correction) into the
    model (through its state dict): the later blocks calibrate on the model as it will run."""
    from moe.quant.calibrate import Target, set_target_weight

    for param, result in solved.items():
        parts = result if isinstance(result, list) else [result]
        for e, part in enumerate(parts):
            set_target_weight(model_state, Target(param, e if isinstance(result, list) else None, ""), part.effective())


def _collect(solved: dict, targets, results, config) -> None:
    """Put each target's result where it goes: a linear's whole weight, or one expert's slice of
    a stacked weight (a list of its layer's E, from ``config``: layers may differ in E)."""
    from moe.quant.calibrate import target_layer

    for target, result in zip(targets, results):
        if target.expert is None:
            solved[target.param] = result
        else:
            experts = config.moe_config(target_layer(target)).num_experts
            solved.setdefault(target.param, [None] * experts)[target.expert] = result


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
    size_bytes: int = 0
    """The export's size on disk (packed weights, scales, EoRA factors, the rest in full precision)."""
    calibration_ks: Optional[list] = None
    """The k of each calibration pass (a per-layer list where the layers differ); None for RTN."""


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
    from moe.quant.calibrate import all_targets, block_state, eora_target, merge_hessians, stage_targets, target_weight
    from moe.quant.storage import QUANT_FORMAT, quantized_state, size_on_disk

    start = time.perf_counter()
    target_dir = Path(out).expanduser()
    if (target_dir / CONFIG_NAME).exists() or (target_dir / WEIGHTS_NAME).exists():
        if not overwrite:
            raise UserError(f"{str(target_dir)!r} already holds an exported model; pass --overwrite to replace it")
    meta = _read_export_meta(model_path)
    if meta.get("quantization"):
        raise UserError(f"{model_path!r} is already quantized ({meta['quantization'].get('method')}); quantize the full-precision export")
    model = load_pretrained(model_path, device="cpu")  # the driver's copy; the tasks move blocks to the device
    if options.experts is not None:  # the export's k: the one given, or the first of a list
        check_ks(options.experts, max(layer.num_experts for layer in _moe_layers(model)))
        set_active_experts(model, options.ks[0])
    runs = calibration_runs(model, options)
    run_block_ks = [_block_ks(model, run) for run in runs]  # [pass][block]
    config = model.config
    spec = options.spec
    state = model.state_dict()  # shares storage with the model: writing it writes the model
    if options.eora:
        check_eora_rank(config, state, options.eora)
    solved: dict = {}
    sigma = None
    tasks = 0
    resumed = 0

    if options.method == "rtn":
        for target in all_targets(config):
            _collect(solved, [target], [rtn(target_weight(state, target), spec)], config)
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
            sigma = calibration_sigma(model, input_ids, cluster.device, runs)
            parts = shard_slices(input_ids.shape[0], options.shards)
            embedded = [cluster.submit("_embed_task", state["embed.weight"], input_ids[part]) for part in parts]
            hidden = [list(embedded) for _ in runs]  # [pass][shard]: block inputs at each pass's k
            blocks = range(config.num_layers)
            if progress:
                from tqdm import tqdm

                blocks = tqdm(blocks, desc=f"quantize {options.label} w{options.bits}", unit="block", dynamic_ncols=True)
                stack.callback(blocks.close)  # closed before a stop's message, not at garbage collection
            for layer_idx in blocks:
                block_solved = job.load_block(layer_idx)
                if block_solved is None:
                    block_solved = {}
                    for stage in (1, 2):
                        targets = stage_targets(config, layer_idx, stage)
                        if not targets:
                            continue
                        block_ref = cluster.put(block_state(model, layer_idx))
                        captured = _gather(cluster, [
                            cluster.submit("_capture_task", config.to_dict(), layer_idx, block_ref, ks[layer_idx], h, stage,
                                           options.agq)
                            for ks, shards in zip(run_block_ks, hidden) for h in shards],
                            f"block {layer_idx} stage {stage} capture", False)
                        hessians = merge_hessians(captured)  # summed over the shards and the passes' ks
                        refs = [cluster.submit("_solve_task", target_weight(state, t), hessians[t.hessian], spec,
                                               options.block_size, options.percdamp, options.act_order,
                                               options.eora if eora_target(t) else 0) for t in targets]
                        stage_solved: dict = {}
                        _collect(stage_solved, targets, _gather(cluster, refs, f"block {layer_idx} stage {stage} solve",
                                                                progress), config)
                        _apply(state, stage_solved)
                        block_solved.update(stage_solved)
                    job.save_block(layer_idx, block_solved, spec)
                else:
                    _apply(state, block_solved)
                    resumed += 1
                solved.update(block_solved)
                if layer_idx + 1 < config.num_layers:
                    block_ref = cluster.put(block_state(model, layer_idx))
                    hidden = [[cluster.submit("_advance_task", config.to_dict(), layer_idx, block_ref, ks[layer_idx], h)
                               for h in shards] for ks, shards in zip(run_block_ks, hidden)]
            tasks = cluster.tasks
    if options.method == "rtn":
        _apply(state, solved)
    wall = time.perf_counter() - start
    tensors, entries = quantized_state(model.state_dict(), solved)
    quantization = {
        "format": QUANT_FORMAT, "method": options.method, "label": options.label, "spec": spec.to_dict(),
        "options": asdict(options), "tensors": entries, "calibration_sigma": sigma, "ray_tasks": tasks,
        "calibration_device": cluster.device if options.method != "rtn" else None,
        "calibration_ks": runs if options.method != "rtn" else None,
        "eora_rank": options.eora or None,
        "wall_s": round(wall, 3), "source": str(Path(model_path).expanduser().resolve()),
    }
    extra = {key: meta[key] for key in ("data", "source") if key in meta}
    write_export(model, tensors, target_dir, {**extra, "quantization": quantization})
    if options.method != "rtn":
        job.finished()
    return QuantizeResult(str(target_dir), options.label, wall, tasks, sigma, resumed,
                          cluster.device if options.method != "rtn" else "cpu", size_on_disk(target_dir),
                          [run[0] if len(set(run)) == 1 else run for run in runs] if options.method != "rtn" else None)


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
