"""Expert compute: grouped matrix multiplies over tokens sorted by expert.

Imports torch (and, from the Triton issue on, triton) and nothing of ours. The public entry point is
:func:`grouped_mm`, with the semantics of :func:`torch.nn.functional.grouped_mm`.
"""

from kernels.expert_mlp import expert_mlp, expert_mlp_reference, release_gradient_buffers
from kernels.grouped_mm import BACKENDS, grouped_mm, grouped_mm_loop, offsets_from_counts
from kernels.grouping import group_by_expert_triton, grouping_kernel_applies

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
]
