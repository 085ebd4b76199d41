"""Routers: which k experts each token goes to, and with what weights.

One class covers both routers of the project, because they differ only in where the gate weight
comes from:

- learned top-k: ``weight`` is an ``nn.Parameter`` initialised N(0, router_init_std);
- fixed random (SMoE-Dropout): ``weight`` is a persistent fp32 *buffer* drawn N(0, router_init_std)
  from a CPU generator seeded by (router_seed, layer index). It is saved in checkpoints, is the same
  on every rank without communication, never gets a gradient and is never seen by an optimizer.

Both select the top-k of ``scores + expert_bias`` (the bias only when bias balancing is on) and
weight the chosen experts by the *unbiased* scores, renormalised over the k if ``normalize_topk``.
With softmax and ``normalize_topk`` the weights equal a softmax over the k selected logits,
SMoE-Dropout's rule.

Where no ``[T, E]`` probabilities are needed (no aux or mutual-information loss), a GPU router takes
``kernels.topk_route_triton``: the scores, the top-k, the weights and the counts in one Triton
kernel, by the same formulas (``kernels.routing`` says where it applies).

Precision (Megatron-core's ``moe_router_dtype="fp32"``): whatever the model's dtype, the logits,
scores, top-k, gate weights and the router's gradient are computed in fp32 (:func:`router_logits`
upcasts inside one autograd function, so no fp32 copy of the tokens is kept for backward), and the
router weight itself stays fp32 when the module is cast with ``.to(torch.bfloat16)``/``.half()``,
as the expert bias and the fixed random gate do: a bf16 model routes its tokens as the fp32 model
with the same weights would. (DeepSpeed's bf16 engine casts every parameter itself; there the
router weight is bf16-valued, its fp32 master copy lives in the optimizer, and the arithmetic is
still fp32.) The MoE layer casts the gate weights once, to the experts' dtype, before dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from moe.balance import (
    capacity_keep_mask,
    expert_capacity,
    mutual_information_loss,
    router_z_loss,
    switch_aux_loss,
)
from moe.config import MoEConfig


@dataclass
class Routing:
    """What a router decided for T tokens (all tensors on the input's device)."""

    indices: torch.Tensor
    """[T, k] int64: the experts each token chose, in order of selection score."""
    weights: torch.Tensor
    """[T, k] fp32: gate weight of each choice (0 where the choice was dropped by capacity)."""
    tokens_per_expert: torch.Tensor
    """[E] int64: assignments each expert computes (after capacity dropping)."""
    routed_per_expert: torch.Tensor
    """[E] int64: assignments each expert was chosen for (before dropping): the demand."""
    kept: Optional[torch.Tensor] = None
    """[T, k] bool: False where capacity dropped the choice; None when dropless."""
    aux_loss: Optional[torch.Tensor] = None
    """Scalar, already times aux_loss_coeff; training mode with balance="aux_loss" only."""
    z_loss: Optional[torch.Tensor] = None
    """Scalar, already times z_loss_coeff; training mode with z_loss_coeff > 0 only."""
    mi_loss: Optional[torch.Tensor] = None
    """Scalar, already times mi_loss_coeff (ModuleFormer's H(m|x) - H(m)); training mode with
    mi_loss_coeff > 0 only."""

    @property
    def num_dropped(self) -> int:
        return 0 if self.kept is None else int((~self.kept).sum())

    @property
    def dropped_fraction(self) -> float:
        return self.num_dropped / max(1, self.indices.numel())

    def detached(self) -> "Routing":
        """A copy that holds no autograd graph (for inspection after the forward)."""
        return Routing(
            indices=self.indices,
            weights=self.weights.detach(),
            tokens_per_expert=self.tokens_per_expert,
            routed_per_expert=self.routed_per_expert,
            kept=self.kept,
            aux_loss=None if self.aux_loss is None else self.aux_loss.detach(),
            z_loss=None if self.z_loss is None else self.z_loss.detach(),
            mi_loss=None if self.mi_loss is None else self.mi_loss.detach(),
        )


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[num_experts]`` int64 counts of ``expert_ids`` (ids in 0..num_experts-1). Unlike
    ``torch.bincount`` its shape never depends on the data, so ``torch.compile`` traces it."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    ones = counts.new_ones(1).expand(expert_ids.shape[0])  # one element, read for every id
    return counts.scatter_add_(0, expert_ids, ones)


class _RouterLogits(torch.autograd.Function):
    """``x @ weight.T`` in fp32 for inputs of any float dtype; the gradients are computed in fp32 and
    returned in the inputs' own dtypes. The inputs are saved as they are (a bf16 ``x`` stays bf16
    between forward and backward) and upcast again in backward."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad_logits):
        x, weight = ctx.saved_tensors
        grad_logits = grad_logits.float()
        grad_x = (grad_logits @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` fp32 logits of ``x [T, d]`` against the gate ``weight [E, d]``, computed in fp32."""
    return _RouterLogits.apply(x, weight)


def random_router_seed(router_seed: int, layer_idx: int) -> int:
    """Seed of layer ``layer_idx``'s fixed random router (distinct per layer)."""
    return router_seed * 1_000_003 + layer_idx


class TopKRouter(nn.Module):
    """Linear gate without bias, top-k selection, optional bias balancing, capacity and losses."""

    def __init__(self, config: MoEConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        num_experts, hidden = config.num_experts, config.hidden_size
        if config.router == "learned":
            self.weight = nn.Parameter(torch.empty(num_experts, hidden))
            nn.init.normal_(self.weight, mean=0.0, std=config.router_init_std)
        else:
            generator = torch.Generator(device="cpu").manual_seed(random_router_seed(config.router_seed, layer_idx))
            weight = torch.randn(num_experts, hidden, generator=generator) * config.router_init_std
            self.register_buffer("weight", weight)  # [E, d], frozen
        if config.uses_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("bias_updates", torch.zeros((), dtype=torch.int64))
            # Demand since the last bias update; accumulates over micro-batches, not checkpointed.
            self.register_buffer("pending_tokens", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        else:
            self.expert_bias = None

    @property
    def is_learned(self) -> bool:
        return isinstance(self.weight, nn.Parameter)

    def _apply(self, fn, recurse=True):
        # Keep the router fp32 through model.to(bf16)/half(): the bias moves in steps of ~1e-3, the
        # frozen gate must stay bit-identical everywhere, and a learned gate rounded to bf16 would
        # send some tokens to other experts than the fp32 model with the same weights does.
        keep = {name: tensor for name in ("expert_bias", "weight")
                if (tensor := getattr(self, name, None)) is not None and tensor.dtype == torch.float32}
        keep = {name: (tensor.data if isinstance(tensor, nn.Parameter) else tensor) for name, tensor in keep.items()}
        super()._apply(fn, recurse)
        for name, original in keep.items():
            current = getattr(self, name)
            if current.dtype == torch.float32 or not current.is_floating_point():
                continue
            if isinstance(current, nn.Parameter):  # same Parameter object: its values, not a rounded copy
                current.data = original.to(device=current.device)
                if current.grad is not None:
                    current.grad = current.grad.float()
            else:
                setattr(self, name, original.to(device=current.device))
        return self

    def forward(self, x: torch.Tensor, k: int) -> Routing:
        """Route ``x [T, d]`` to ``k`` experts each."""
        cfg = self.config
        logits = router_logits(x, self.weight)  # [T, E], fp32
        softmax = cfg.score_function == "softmax"
        wants_aux = cfg.balance == "aux_loss" and cfg.aux_loss_coeff > 0
        wants_mi = cfg.mi_loss_coeff > 0
        use_aux, use_mi = self.training and wants_aux, self.training and wants_mi
        scores = routed = None
        if not (wants_aux or wants_mi) and kernels.routing_kernel_applies(logits, cfg.num_experts):
            # On a GPU, where no [T, E] probabilities are needed: the selection, the weights (from the
            # unbiased scores, the same formulas) and the counts in one Triton kernel, its backward in one more.
            bias = None if self.expert_bias is None else self.expert_bias.float()  # fp32 already: no copy
            indices, weights, routed = kernels.topk_route_triton(logits, k, bias, cfg.score_function, cfg.normalize_topk)
        elif softmax and cfg.normalize_topk and self.expert_bias is None and not (wants_aux or wants_mi):
            # The softmax is monotonic, so the top-k of the logits are the top-k of the scores, and the
            # renormalised weights are a softmax over the k chosen logits: no [T, E] softmax at all.
            # Chosen from the config alone, so a model computes its weights one way in every mode.
            top_logits, indices = torch.topk(logits, k, dim=-1)  # [T, k]
            weights = torch.softmax(top_logits, dim=-1)
        else:
            scores = torch.softmax(logits, dim=-1) if softmax else torch.sigmoid(logits)
            selection = scores.detach()
            if self.expert_bias is not None:
                selection = selection + self.expert_bias
            indices = torch.topk(selection, k, dim=-1).indices  # [T, k]
            weights = scores.gather(1, indices)  # [T, k], unbiased scores
            if cfg.normalize_topk:
                weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        if routed is None:
            routed = expert_counts(indices.flatten(), cfg.num_experts)  # [E]
        kept = None
        tokens_per_expert = routed
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], k, cfg.num_experts, cfg.capacity_factor)
            kept = capacity_keep_mask(indices, weights, cfg.num_experts, capacity, cfg.drop_policy)
            weights = weights * kept
            tokens_per_expert = expert_counts(indices.masked_fill(~kept, cfg.num_experts).flatten(), cfg.num_experts + 1)[:-1]

        if self.expert_bias is not None and self.training and torch.is_grad_enabled():
            self.pending_tokens += routed

        aux_loss = z_loss = mi_loss = None
        if use_aux or use_mi:
            # a distribution over all E experts per token, from the unbiased scores: the softmax
            # itself, or the sigmoid scores divided by their per-token sum
            probs = scores if cfg.score_function == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
            if use_aux:
                aux_loss = cfg.aux_loss_coeff * switch_aux_loss(probs, routed, k)
            if use_mi:
                mi_loss = cfg.mi_loss_coeff * mutual_information_loss(probs)
        if self.training and cfg.z_loss_coeff > 0:
            z_loss = cfg.z_loss_coeff * router_z_loss(logits)
        return Routing(indices, weights, tokens_per_expert, routed, kept, aux_loss, z_loss, mi_loss)
