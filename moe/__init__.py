"""The MoE model on one device: configs, routers, balancing, schedules, experts, the MoE layer.

Imports ``kernels``; never ``parallel``, ``launch``, deepspeed or ray.

    >>> import torch
    >>> from moe import MoEConfig, MoELayer
    >>> layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2))
    >>> layer(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
"""

from moe import balance
from moe.compile import compile_blocks
from moe.config import MoEConfig
from moe.dispatch import GroupedRows, LocalDispatcher
from moe.experts import GroupedExperts
from moe.layer import MoELayer
from moe.model import ModelConfig, MoETransformer
from moe.pretrained import load_pretrained, save_pretrained
from moe.metrics import LoadMeter, collect_routing_metrics, load_entropy, max_violation, moe_layers, routing_metrics
from moe.routers import Routing, TopKRouter
from moe.runtime import advance_k_schedule, collect_aux_losses, set_active_experts, update_expert_biases
from moe.schedules import k_at_step

__all__ = [
    "GroupedExperts",
    "GroupedRows",
    "LoadMeter",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoETransformer",
    "ModelConfig",
    "Routing",
    "TopKRouter",
    "advance_k_schedule",
    "balance",
    "collect_aux_losses",
    "collect_routing_metrics",
    "compile_blocks",
    "k_at_step",
    "load_entropy",
    "load_pretrained",
    "max_violation",
    "moe_layers",
    "routing_metrics",
    "save_pretrained",
    "set_active_experts",
    "update_expert_biases",
]
