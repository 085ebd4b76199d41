"""Expert compute: grouped matrix multiplies over tokens sorted by expert, and the Triton kernels
that get the tokens there (a router's top-k selection, the grouping of its choices by expert).

Imports torch (and, from the Triton issue on, triton) and nothing of ours. The public entry point is
:func:`grouped_mm`, with the semantics of :func:`torch.nn.functional.grouped_mm`.
"""

from kernels.expert_mlp import expert_mlp, expert_mlp_reference, release_gradient_buffers
from kernels.grouped_mm import BACKENDS, grouped_mm, grouped_mm_loop, offsets_from_counts
from kernels.routing import group_by_expert_triton, grouping_kernel_applies, routing_kernel_applies, topk_route_triton

__all__ = [
    "BACKENDS",
    "expert_mlp",
    "expert_mlp_reference",
    "group_by_expert_triton",
    "grouped_mm",
    "grouped_mm_loop",
    "grouping_kernel_applies",
    "offsets_from_counts",
    "release_gradient_buffers",
    "routing_kernel_applies",
    "topk_route_triton",
]
