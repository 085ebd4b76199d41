"""Layer-by-layer calibration of a :class:`~moe.model.MoETransformer`: the pieces one solve needs.

GPTQ quantizes a model one block at a time: the block's inputs come from the blocks before it,
*already quantized*, so each block corrects the error of the ones before. Inside a block there are
two stages, because MoEQuant's AGQ needs the experts' routing to come from the quantized router:

- stage 1: the attention projections and the router (in a dense block, its FFN) get Hessians from
  the block's inputs and are quantized;
- stage 2 (MoE blocks): with the quantized attention and router in place, the routing is recorded
  again, and each expert's linears get a Hessian from the tokens routed to that expert. Under AGQ
  each token counts with its gate weight c (H = sum c x x^T, for w1, w3 and w2 alike); without it
  every routed token counts once.

A *target* is one linear ``W [out, in]`` to quantize. nn.Linear weights are used as they are;
expert e of a stacked tensor (``w1 [E, d, f]``, ``x @ w1[e]``) is the linear ``w1[e].T``. The
embedding and the LM head (tied to it by default) and the norms stay in full precision, as in
GPTQ and MoEQuant.

Everything here works on one block and one shard of the calibration set, so the work can be spread:
``launch.quantize`` runs these functions as Ray tasks and sums the shards' Hessians.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from kernels.expert_mlp import activate
from moe.dispatch import GroupedRows
from moe.layer import MoELayer
from moe.model import Block, DenseFFN, ModelConfig, MoETransformer, rotary_table
from moe.quant.gptq import Hessian


@dataclass(frozen=True)
class Target:
    """One linear to quantize: a model parameter, or one expert's slice of a stacked one."""

    param: str
    """State-dict name, e.g. ``blocks.0.attn.qkv.weight`` or ``blocks.0.ffn.experts.w1``."""
    expert: Optional[int]
    """Expert index into the stacked tensor; None for a plain linear weight."""
    hessian: str
    """Key of the Hessian of its inputs within the block (w1 and w3 of one expert share one)."""

    @property
    def name(self) -> str:
        return self.param if self.expert is None else f"{self.param}[{self.expert}]"


def eora_target(target: Target) -> bool:
    """Whether EoRA (``moe.quant.eora``) corrects ``target``: every quantized linear but the router.
    The router is ``[E, d]`` with E often no larger than the rank, where a rank-r correction is the
    full-precision router stored in a larger form; its quantization error is what AGQ already
    accounts for, by recording the experts' routing with the quantized router."""
    return target.hessian != "router"


def block_prefix(layer_idx: int) -> str:
    return f"blocks.{layer_idx}."


def target_layer(target: Target) -> int:
    """The block index of a target (``blocks.{l}.``...)."""
    return int(target.param.split(".")[1])


def stage_targets(config: ModelConfig, layer_idx: int, stage: int) -> list[Target]:
    """The targets of block ``layer_idx`` quantized in ``stage`` (1: attention and router or the
    dense FFN; 2: the experts of an MoE block, none for a dense block)."""
    prefix = block_prefix(layer_idx)
    moe_block = config.is_moe_layer(layer_idx)
    if stage == 1:
        targets = [Target(prefix + "attn.qkv.weight", None, "attn.qkv"), Target(prefix + "attn.out.weight", None, "attn.out")]
        if moe_block:
            targets.append(Target(prefix + "ffn.router.weight", None, "router"))
            if config.moe.num_shared_experts:  # always active: quantized like a dense FFN
                targets += [Target(prefix + f"ffn.shared_mlp.{name}.weight", None, hessian)
                            for name, hessian in (("w1", "shared.in"), ("w3", "shared.in"), ("w2", "shared.mid"))]
        else:
            targets += [Target(prefix + f"ffn.{name}.weight", None, hessian)
                        for name, hessian in (("w1", "ffn.in"), ("w3", "ffn.in"), ("w2", "ffn.mid"))]
        return targets
    if stage != 2:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if not moe_block:
        return []
    names = ("w1", "w3", "w2") if config.moe.activation == "swiglu" else ("w1", "w2")
    return [Target(prefix + f"ffn.experts.{name}", e, f"experts.{'mid' if name == 'w2' else 'in'}.{e}")
            for e in range(config.moe_config(layer_idx).num_experts) for name in names]


def all_targets(config: ModelConfig) -> list[Target]:
    return [t for layer in range(config.num_layers) for stage in (1, 2) for t in stage_targets(config, layer, stage)]


def target_weight(state: dict[str, torch.Tensor], target: Target) -> torch.Tensor:
    """``W [out, in]`` of ``target`` from a state dict (a copy in fp32)."""
    tensor = state[target.param]
    weight = tensor if target.expert is None else tensor[target.expert].t()
    return weight.detach().float().clone()


def set_target_weight(state: dict[str, torch.Tensor], target: Target, weight: torch.Tensor) -> None:
    """Write ``W [out, in]`` into ``state`` in place (the layout of the parameter is kept)."""
    tensor = state[target.param]
    with torch.no_grad():
        if target.expert is None:
            tensor.copy_(weight.to(tensor.dtype))
        else:
            tensor[target.expert].copy_(weight.t().to(tensor.dtype))


# ------------------------------------------------------------------------------------------------
# One block as a module of its own (what a worker holds)
# ------------------------------------------------------------------------------------------------


def block_state(model: MoETransformer, layer_idx: int) -> dict[str, torch.Tensor]:
    """Block ``layer_idx``'s tensors, named without the ``blocks.{l}.`` prefix (detached copies)."""
    return {name: t.detach().clone() for name, t in model.blocks[layer_idx].state_dict().items()}


def build_block(config: ModelConfig, layer_idx: int, state: dict[str, torch.Tensor], active_experts: int) -> Block:
    """A standalone :class:`~moe.model.Block` holding ``state``, in eval mode, at k = ``active_experts``."""
    block = Block(config, layer_idx)
    block.load_state_dict(state)
    if isinstance(block.ffn, MoELayer):
        block.ffn.set_active_experts(active_experts)
    return block.eval()


def block_rotary(config: ModelConfig) -> torch.Tensor:
    return rotary_table(config.hidden_size // config.num_heads, config.max_seq_len, config.rope_theta)


@torch.no_grad()
def embed_tokens(embed_weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The first block's inputs ``[B, S, d]``."""
    return F.embedding(input_ids, embed_weight)


@torch.no_grad()
def run_block(block: Block, hidden: torch.Tensor, rotary: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``block(hidden)`` for ``hidden [B, S, d]``, a few sequences at a time."""
    return torch.cat([block(chunk, rotary) for chunk in hidden.split(batch_size)])


@torch.no_grad()
def capture_hessians(
    block: Block, hidden: torch.Tensor, rotary: torch.Tensor, stage: int, agq: bool = False, batch_size: int = 16
) -> dict[str, Hessian]:
    """Hessians of the inputs of ``block``'s stage-``stage`` targets over ``hidden [B, S, d]``.

    Stage 1: ``attn.qkv``, ``attn.out`` and ``router`` (MoE block) or ``ffn.in``/``ffn.mid`` (dense).
    Stage 2: ``experts.in.{e}`` (the rows routed to expert e, what w1 and w3 read) and
    ``experts.mid.{e}`` (what w2 reads: act(x w1) * (x w3)), each row weighted by its gate weight
    when ``agq``. Experts no row reached get a Hessian with ``count == 0``.
    """
    d = hidden.shape[-1]
    device = hidden.device  # the Hessians accumulate where the block runs
    hessians: dict[str, Hessian] = {}
    handles = []

    def record(key: str, width: int):
        def hook(module, args):
            x = args[0]
            hessians.setdefault(key, Hessian(width, device)).add(x.reshape(-1, x.shape[-1]).float())
        return hook

    if stage == 1:
        handles.append(block.attn.qkv.register_forward_pre_hook(record("attn.qkv", d)))
        handles.append(block.attn.out.register_forward_pre_hook(record("attn.out", d)))
        if isinstance(block.ffn, MoELayer):
            handles.append(block.ffn.router.register_forward_pre_hook(record("router", d)))
            shared = block.ffn.shared_mlp
            if shared is not None:
                handles.append(shared.w1.register_forward_pre_hook(record("shared.in", d)))
                handles.append(shared.w2.register_forward_pre_hook(record("shared.mid", shared.w2.in_features)))
        else:
            assert isinstance(block.ffn, DenseFFN)
            handles.append(block.ffn.w1.register_forward_pre_hook(record("ffn.in", d)))
            handles.append(block.ffn.w2.register_forward_pre_hook(record("ffn.mid", block.ffn.w2.in_features)))
    elif stage == 2:
        if not isinstance(block.ffn, MoELayer):
            return {}
        experts = block.ffn.experts
        num_experts, ffn = experts.num_experts, experts.w2.shape[1]
        for e in range(num_experts):
            hessians[f"experts.in.{e}"] = Hessian(d, device)
            hessians[f"experts.mid.{e}"] = Hessian(ffn, device)

        def record_experts(module, args):
            rows: GroupedRows = args[0]
            counts = rows.tokens_per_expert.tolist()
            start = 0
            for e, count in enumerate(counts):
                if count:
                    index = rows.row_index[start : start + count]
                    x = rows.source[index].float()  # [n_e, d]
                    gate = rows.row_weight[start : start + count].float() if agq else None  # [n_e]
                    hessians[f"experts.in.{e}"].add(x, gate)
                    hessians[f"experts.mid.{e}"].add(expert_hidden(experts, e, x), gate)
                start += count

        handles.append(experts.register_forward_pre_hook(record_experts))
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    try:
        run_block(block, hidden, rotary, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def expert_hidden(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """What expert ``e``'s w2 reads for rows ``x [n, d]``: ``act(x w1[e])`` (times ``x w3[e]`` for SwiGLU)."""
    h3 = x @ experts.w3[e].float() if experts.w3 is not None else None
    return activate(experts.activation, x @ experts.w1[e].float(), h3)


def merge_hessians(parts: Iterable[dict[str, Hessian]]) -> dict[str, Hessian]:
    """Sum the shards' Hessians key by key."""
    total: dict[str, Hessian] = {}
    for part in parts:
        for key, hessian in part.items():
            if key in total:
                total[key].merge(hessian)
            else:
                total[key] = hessian
    return total
