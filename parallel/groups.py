"""Process groups for expert parallelism, made by DeepSpeed's own MoE group code.

With world size W and expert-parallel size P (P divides W), ranks form W / P expert-parallel
groups of P consecutive ranks (tokens move by all-to-all inside one) and P expert-data-parallel
groups of W / P ranks with the same slice of experts (expert gradients are reduced inside one).
Dense parameters are data-parallel over all W ranks. This is ``deepspeed.utils.groups``' "E + D"
layout, and the groups are DeepSpeed's own objects (named ``ep_size_P``), so the engine reduces
expert gradients and shards expert optimizer state over exactly these groups:

    W = 4, P = 2:  expert-parallel [0, 1] [2, 3];  expert-data-parallel [0, 2] [1, 3]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moe.errors import UserError


@dataclass(frozen=True)
class ExpertParallelGroups:
    size: int
    """P: ranks that share one copy of all experts (each holds E / P of them)."""
    rank: int
    """This rank's index in its expert-parallel group: it holds experts [rank * E/P, (rank+1) * E/P)."""
    group: dist.ProcessGroup
    """The expert-parallel group (all-to-all)."""
    data_parallel_group: dist.ProcessGroup
    """The expert-data-parallel group (gradient reduction of this rank's experts)."""
    data_parallel_size: int
    name: str
    """DeepSpeed's name for these groups; expert parameters carry it as ``group_name``."""


def expert_parallel_groups(expert_parallel_size: int) -> ExpertParallelGroups:
    """Create (once) and return DeepSpeed's expert and expert-data-parallel groups of this size."""
    from deepspeed.utils import groups

    world_size = dist.get_world_size()
    if expert_parallel_size < 1 or world_size % expert_parallel_size:
        raise UserError(
            f"parallel.expert_parallel_size={expert_parallel_size} is invalid: it must divide the world size ({world_size})"
        )
    name = f"ep_size_{expert_parallel_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    return ExpertParallelGroups(
        size=expert_parallel_size,
        rank=dist.get_rank(group=ep_group),
        group=ep_group,
        data_parallel_group=edp_group,
        data_parallel_size=dist.get_world_size(group=edp_group),
        name=name,
    )
