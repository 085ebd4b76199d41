"""Cluster descriptions: the hardware facts and the few global efficiency knobs of the cost model.

A cluster file (``configs/clusters/*.yaml``) maps one to one onto :class:`Cluster`; unknown keys
and bad values are one :class:`moe.errors.UserError` naming the field. Bandwidths are in GB/s
(gigabytes, not gigabits: 400 Gb/s InfiniBand is 50) per device and direction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from launch.config import _parse_yaml  # YAML 1.2 floats: 989.4e12 is a number
from moe.errors import UserError
from moe.validation import check_choice, check_int, check_number, fail, from_dict

_OWNER = "cluster"


@dataclass
class Cluster:
    """One homogeneous cluster: ``nodes`` machines of ``gpus_per_node`` devices each."""

    gpus_per_node: int
    """Devices (ranks) per node; on a CPU machine, the ranks that share it."""

    nodes: int
    """Nodes (machines)."""

    peak_flops: float
    """Peak dense matmul FLOP/s of one device in the training dtype (bf16 on GPUs, fp32 on CPUs)."""

    memory_gib: float
    """Memory of one device, GiB (on a CPU machine: the RAM one rank may use)."""

    memory_gbps: float
    """Achievable device-memory bandwidth, GB/s: what elementwise work and the optimizer step stream at."""

    intra_node_gbps: float
    """Bandwidth between two devices of one node, GB/s per device and direction (NVLink; shared memory)."""

    inter_node_gbps: float
    """Bandwidth from one device to another node, GB/s per device and direction (its NIC's share)."""

    name: str = ""
    """What the file describes, for the printed header."""

    device: str = "cuda"
    """"cuda" or "cpu": what ``train.precision: auto`` resolves to there (bf16 on cuda, fp32 on cpu)."""

    matmul_efficiency: float = 0.7
    """Fraction of ``peak_flops`` the model's matmuls reach on average (default 0.7: a large dense
    GEMM on current GPUs gets 0.7-0.85 of the data-sheet peak)."""

    op_overhead_us: float = 10.0
    """Host time per dispatched tensor op (eager PyTorch, autograd and DeepSpeed hooks included), µs.
    Default 10: eager PyTorch's per-op cost on a fast host."""

    collective_latency_us: float = 20.0
    """Fixed cost of one collective call (or of one ring step), µs. Default 20: NCCL's small-message time."""

    memory_reserve_gib: float = 1.0
    """Device memory the tensors cannot use (CUDA context, allocator fragmentation), GiB."""

    provenance: dict = field(default_factory=dict)
    """Field name -> how its value was obtained (a command and a date, or a data sheet); printed by
    ``moe plan --validate`` so that a knob set from a measurement is never passed off as a prediction."""

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes"):
            check_int(_OWNER, name, getattr(self, name))
        for name in ("peak_flops", "memory_gib", "memory_gbps", "intra_node_gbps", "inter_node_gbps"):
            check_number(_OWNER, name, getattr(self, name), strict=True)
        check_choice(_OWNER, "device", self.device, ("cuda", "cpu"))
        check_number(_OWNER, "matmul_efficiency", self.matmul_efficiency, strict=True)
        if self.matmul_efficiency > 1:
            fail(_OWNER, "matmul_efficiency", self.matmul_efficiency, "expected a fraction in (0, 1]")
        for name in ("op_overhead_us", "collective_latency_us", "memory_reserve_gib"):
            check_number(_OWNER, name, getattr(self, name))
        if self.memory_reserve_gib >= self.memory_gib:
            fail(_OWNER, "memory_reserve_gib", self.memory_reserve_gib, f"expected less than memory_gib ({self.memory_gib})")
        if not isinstance(self.name, str):
            fail(_OWNER, "name", self.name, "expected a string")
        if not isinstance(self.provenance, Mapping) or not all(isinstance(k, str) for k in self.provenance):
            fail(_OWNER, "provenance", self.provenance, "expected a mapping of field name -> text")
        unknown = sorted(set(self.provenance) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            fail(_OWNER, "provenance", unknown[0], "expected the name of a cluster field")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def bf16(self) -> bool:
        """What ``train.precision: auto`` means here (``parallel.engine.use_bf16``'s rule)."""
        return self.device == "cuda"

    def resized(self, nodes: int | None = None, gpus_per_node: int | None = None) -> "Cluster":
        """The same hardware with another node count or devices per node (``--nodes``, ``--gpus``)."""
        changes = {k: v for k, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node)) if v is not None}
        return dataclasses.replace(self, **changes)


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cluster file {str(path)!r} does not exist")
    try:
        values = _parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of cluster fields at the top level")
    return cluster_from_dict(values, where=str(path))


def cluster_from_dict(values: Mapping[str, Any], where: str = "cluster") -> Cluster:
    """A :class:`Cluster` from a mapping; a missing, unknown or bad field is one UserError naming it."""
    required = [f.name for f in dataclasses.fields(Cluster)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r} (a cluster names {', '.join(required)})")
    try:
        cluster = from_dict(Cluster, values, owner=_OWNER)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return cluster
