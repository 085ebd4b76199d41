"""Run configs: YAML files that map one to one onto dataclasses, with ``--set`` overrides.

A run config has the sections ``model`` (:class:`moe.ModelConfig`, with its nested ``moe``
section), ``data`` (:class:`DataConfig`), ``train`` (:class:`TrainConfig`), ``parallel``
(:class:`ParallelConfig`, optional), ``deepspeed`` (the
DeepSpeed config, passed to ``deepspeed.initialize`` after the trainer fills in the batch sizes)
and ``out_dir``. Unknown keys, in any section, are errors that name the key.

Overrides: ``--set train.lr=1e-3 --set model.moe.num_experts=16``; the value is parsed as YAML, so
numbers, booleans, null and lists work as they do in the file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from moe import ModelConfig
from moe.errors import UserError
from moe.validation import check_bool, check_choice, check_int, check_number, fail, from_dict


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    """Where the tokens come from."""

    path: Optional[str] = None
    """A .txt/.jsonl file or a folder of them; null = the built-in corpus (the stdlib's .py files)."""

    val_permille: int = 50
    """Share held out for validation, in thousandths: whole files chosen by a hash of their path, or,
    when that leaves a side empty (a single file), the last bytes of the corpus (launch/data.py)."""

    cache_dir: str = "runs/cache"
    """Where tokenised corpora are cached (one folder per corpus fingerprint)."""

    val_tokens: int = 65_536
    """Predicted tokens every validation of the model reads (the trainer's, ``moe eval``,
    ``moe slim``, the experiments, ``moe quantize --compare``): ``val_tokens // val_seq_len``
    windows spread evenly over the whole validation split (``launch.data.validation_windows``)."""

    val_seq_len: Optional[int] = None
    """Tokens per validation window; null: ``train.seq_len``. Recorded with the model, resolved."""

    def __post_init__(self) -> None:
        check_int("data", "val_permille", self.val_permille, minimum=0)
        check_int("data", "val_tokens", self.val_tokens)
        if self.val_seq_len is not None:
            check_int("data", "val_seq_len", self.val_seq_len)
        if self.val_permille >= 1000:
            fail("data", "val_permille", self.val_permille, "expected 0..999")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 300
    """Optimizer steps."""

    micro_batch_size: int = 8
    """Sequences per rank per micro-batch."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    seq_len: int = 128
    """Tokens per training sequence (at most model.max_seq_len)."""

    lr: float = 3e-3
    """Peak learning rate (AdamW)."""

    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""

    warmup_steps: int = 30
    """Linear warmup from 0 to lr over these steps."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    betas: tuple = (0.9, 0.95)
    """AdamW betas."""

    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables it)."""

    seed: int = 0
    """Seed of the weights, the sampler and dropout-free randomness."""

    log_every: int = 10
    """Steps between metric records (console, TensorBoard, JSONL)."""

    eval_every: int = 100
    """Steps between validation passes (also one before the first step and one at the end; 0: none)."""

    save_every: int = 100
    """Steps between DeepSpeed checkpoints (and one at the end)."""

    keep_checkpoints: int = 3
    """Newest checkpoints kept; older ones are deleted once a newer one is complete (0 keeps all)."""

    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16"."""

    compile: bool = False
    """torch.compile each transformer block (``moe.compile_blocks``) before the DeepSpeed engine is
    built: one graph per block, reused by every layer; parameter names and checkpoints unchanged."""

    init: Optional[str] = None
    """An exported model (``moe export``, ``moe upcycle``) whose weights a fresh run starts from;
    its model section replaces the config's (``--set model...`` still applies on top). A resumed
    run continues its checkpoint instead. ``moe train --init PATH`` sets it."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len", "log_every", "save_every"):
            check_int("train", name, getattr(self, name))
        check_int("train", "warmup_steps", self.warmup_steps, minimum=0)
        check_int("train", "eval_every", self.eval_every, minimum=0)
        check_int("train", "seed", self.seed, minimum=0)
        check_int("train", "keep_checkpoints", self.keep_checkpoints, minimum=0)
        check_choice("train", "precision", self.precision, ("auto", "fp32", "bf16"))
        check_bool("train", "compile", self.compile)
        if self.init is not None and not isinstance(self.init, str):
            fail("train", "init", self.init, "expected the path of an exported model, or null")
        check_number("train", "lr", self.lr, strict=True)
        check_number("train", "min_lr_ratio", self.min_lr_ratio)
        check_number("train", "weight_decay", self.weight_decay)
        check_number("train", "grad_clip", self.grad_clip)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            fail("train", "betas", self.betas, "expected two numbers in [0, 1)")


@dataclass
class ParallelConfig:
    """How the model is spread over ranks (beyond data parallelism)."""

    expert_parallel_size: int = 1
    """P: ranks that split each MoE layer's experts between them (E/P each), exchanging tokens by
    all-to-all. Must divide the number of experts and the world size; 1 = every rank holds all
    experts (pure data parallelism)."""

    def __post_init__(self) -> None:
        check_int("parallel", "expert_parallel_size", self.expert_parallel_size)


@dataclass
class RunConfig:
    """A whole run: what to train, on what, how, and where to write it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 0}})
    """DeepSpeed config; the trainer sets the batch sizes, optimizer and scheduler from ``train``."""
    out_dir: str = "runs/default"
    """Where checkpoints, logs, TensorBoard files and exports go."""

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise UserError(
                f"train.seq_len={self.train.seq_len!r} is invalid: at most model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.data.val_seq_len is None:
            self.data.val_seq_len = self.train.seq_len  # resolved, so the run records what it validated on
        if self.data.val_seq_len > self.model.max_seq_len:
            raise UserError(
                f"data.val_seq_len={self.data.val_seq_len!r} is invalid: at most model.max_seq_len ({self.model.max_seq_len})"
            )
        ep, experts = self.parallel.expert_parallel_size, self.model.moe.num_experts
        if any(e % ep for e in (experts if isinstance(experts, list) else [experts])):
            raise UserError(
                f"parallel.expert_parallel_size={ep} is invalid: it must divide model.moe.num_experts ({experts}"
                f"{', every block' if isinstance(experts, list) else ''})"
            )
        if not isinstance(self.deepspeed, dict):
            raise UserError(f"deepspeed={self.deepspeed!r} is invalid: expected a mapping (a DeepSpeed config)")
        owned = sorted(set(TRAINER_OWNED_DEEPSPEED_KEYS) & set(self.deepspeed))
        if owned:
            raise UserError(
                f"deepspeed.{owned[0]} is set by the trainer from train.{TRAINER_OWNED_DEEPSPEED_KEYS[owned[0]]}; "
                "remove it from the deepspeed section"
            )
        zero = self.deepspeed.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
        if stage not in (0, 1, 2):
            raise UserError(f"deepspeed.zero_optimization.stage={stage!r} is invalid: expected 0, 1 or 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRAINER_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "micro_batch_size and grad_accum",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "grad_clip",
    "optimizer": "lr, betas and weight_decay",
    "scheduler": "warmup_steps and min_lr_ratio",
    "bf16": "precision",
    "fp16": "precision",
}
"""DeepSpeed keys the trainer fills in, mapped to the ``train`` fields they come from."""

REQUIRED_KEYS = ("model", "model.moe", "train")
"""Keys a config file must name: a run that silently trained a default model would surprise."""

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig}


REPLACED_KEYS = {
    "train.eval_batches": "data.val_tokens (predicted tokens of the validation windows every command reads; "
                          "default 65536)",
}
"""Keys that configs of earlier versions had, and what took their place."""


def _section(cls, values: Any, name: str):
    if values is None:
        return cls()
    if not isinstance(values, Mapping):
        raise UserError(f"{name}: expected a mapping, got {type(values).__name__}")
    for key in values:
        if f"{name}.{key}" in REPLACED_KEYS:
            raise UserError(f"{name}.{key} is no longer a setting: it was replaced by {REPLACED_KEYS[f'{name}.{key}']}")
    return from_dict(cls, values, owner=name)


def run_config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    known = set(SECTIONS) | {"deepspeed", "out_dir"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    sections = {name: _section(cls, values.get(name), name) for name, cls in SECTIONS.items()}
    deepspeed = values.get("deepspeed") or {}
    return RunConfig(**sections, deepspeed=deepspeed, out_dir=str(values.get("out_dir", RunConfig.out_dir)))


def apply_override(values: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (any depth) to the raw mapping ``values`` in place."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise UserError(f"--set {assignment!r}: empty key in {dotted!r}")
    node = values
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = _parse_yaml(raw) if raw.strip() else None


def _model_from_init(values: dict, overrides: Sequence[str]) -> None:
    """With ``train.init`` set: the path made absolute, and the model section taken from that
    export's config (then the ``model.`` overrides again, so they still win)."""
    from moe.files import read_json

    train = values.get("train")
    init = train.get("init") if isinstance(train, dict) else None
    if init is None:
        return
    if not isinstance(init, str):
        raise UserError(f"train.init={init!r} is invalid: expected the path of an exported model")
    folder = Path(init).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise UserError(f"train.init={init!r}: {str(folder)!r} holds no exported model (config.json); give the "
                        "folder `moe export` or `moe upcycle` wrote")
    meta = read_json(folder / "config.json", what="exported model's config")
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"train.init: {str(folder / 'config.json')!r} has no \"model\" section")
    train["init"] = str(folder)
    values["model"] = dict(meta["model"])
    for assignment in overrides:
        if assignment.split("=", 1)[0].strip().startswith("model."):
            apply_override(values, assignment)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        values = _parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(values, assignment)
    _model_from_init(values, overrides)
    for dotted in REQUIRED_KEYS:
        node = values
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            raise UserError(f"{path}: missing key {dotted!r} (a run config must describe the model and the training)")
    try:
        return run_config_from_dict(values)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
