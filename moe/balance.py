"""Load balancing: the auxiliary-loss-free bias update, the Switch/GShard auxiliary loss, the
router z-loss, ModuleFormer's mutual-information loss, and the capacity (token-dropping) rule.

Every function here is pure (tensors in, tensors out); the state they act on (the bias buffer and
the token counts) lives with the router, and :func:`moe.update_expert_biases` applies the update.
"""

from __future__ import annotations

import math

import torch


def updated_expert_bias(
    bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float, mode: str = "sign"
) -> torch.Tensor:
    """One auxiliary-loss-free update (Wang et al. 2024; DeepSeek-V3), for ``[E]`` or ``[L, E]``.

    ``error = mean(tokens_per_expert) - tokens_per_expert`` over the expert axis, then

    - "sign":          ``bias + rate * sign(error)`` (an overloaded expert's bias goes down)
    - "proportional":  ``bias + rate * error / mean``, the relative load error

    The result is fp32 whatever the input dtype (the bias must not drift in bf16).
    """
    counts = tokens_per_expert.to(torch.float32)
    mean = counts.mean(dim=-1, keepdim=True)
    error = mean - counts
    if mode == "sign":
        step = torch.sign(error)
    elif mode == "proportional":
        step = torch.where(mean > 0, error / mean.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(error))
    else:
        raise ValueError(f"updated_expert_bias: mode={mode!r}; expected 'sign' or 'proportional'")
    return bias.to(torch.float32) + rate * step


def switch_aux_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i`` (differentiable in ``probs``).

    ``probs [T, E]`` are the router probabilities over all experts, ``f_i`` the fraction of the
    T * k assignments that went to expert i, ``P_i`` the mean probability of expert i. Equals 1 for
    a perfectly balanced router whose probabilities match its assignments.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    fraction = tokens_per_expert.to(probs.dtype) / (num_tokens * top_k)  # f_i, [E]
    mean_prob = probs.mean(dim=0)  # P_i, [E]
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t(logsumexp(logits_t)^2)``: keeps logits small."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def mutual_information_loss(probs: torch.Tensor) -> torch.Tensor:
    """ModuleFormer's router loss (Shen et al. 2023, "ModuleFormer: Modularity Emerges from
    Mixture-of-Experts", arXiv:2306.04640, the load-balancing loss of its pre-training): minus the
    mutual information between the tokens x of the batch and the experts m,

        ``L = H(m|x) - H(m) = -MI``, with, over the T tokens of ``probs [T, E]``,
        ``p(m)   = 1/T * sum_x p(m|x)``                      (the batch's expert marginal)
        ``H(m)   = -sum_m p(m) log p(m)``                    (high: the load is balanced)
        ``H(m|x) = 1/T * sum_x -sum_m p(m|x) log p(m|x)``    (low: each token concentrates)

    which is the paper's ``L_MI = sum_m p(m) log p(m) - 1/|X| sum_x sum_m g(m|x) log g(m|x)``
    (``X`` the batch's tokens, ``g(m|x)`` the router's distribution), in nats. It lies in
    ``[-log E, 0]``: 0 when every token has the same distribution (all uniform, or all on one
    expert), ``-log E`` when each token is one-hot and the tokens are spread evenly over the
    experts.

    Details, as the paper and its released code (github.com/IBM/ModuleFormer,
    ``moduleformer/utils/gate.py``, ``aux_loss='mi'``) have them:

    - ``p(m|x)`` is the full softmax over all E experts, not the top-k: the code's ``probs`` is
      ``softmax(logits)`` before ``topk``, and ``H(m|x)`` uses ``log_softmax(logits)``.
    - It is computed per forward, over that call's tokens, per layer: the released model builds
      every gate with ``acc_aux_loss=False``, so ``p(m)`` is not accumulated over micro-batches or
      layers. Here that means per micro-batch and, under expert parallelism, per rank (the router
      runs on the rank's own tokens before dispatch).
    - ``0 log 0 = 0``: a probability below the dtype's smallest normal is clamped inside the log
      only, so the value is exact otherwise and the gradient stays finite (the code adds 1e-8
      inside ``log p(m)`` instead).

    ``probs`` must be a distribution per token (rows sum to 1); the router passes its fp32 softmax
    scores, or sigmoid scores divided by their per-token sum, as it does for :func:`switch_aux_loss`.
    """
    num_tokens = probs.shape[0]
    if num_tokens == 0:
        return probs.sum() * 0.0
    tiny = torch.finfo(probs.dtype).tiny
    marginal = probs.mean(dim=0)  # p(m), [E]
    marginal_entropy = -(marginal * marginal.clamp_min(tiny).log()).sum()  # H(m)
    conditional_entropy = -(probs * probs.clamp_min(tiny).log()).sum(dim=-1).mean()  # H(m|x)
    return conditional_entropy - marginal_entropy


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens an expert may take per forward: ``ceil(T * k / E * capacity_factor)``."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def capacity_keep_mask(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int, policy: str
) -> torch.Tensor:
    """Which of the ``[T, k]`` assignments an expert of ``capacity`` slots keeps (bool ``[T, k]``).

    "probs": each expert keeps its ``capacity`` assignments of highest gate weight.
    "position": each expert keeps its first ``capacity`` assignments in token order.
    """
    num_tokens, top_k = indices.shape
    if capacity >= num_tokens:  # no expert can be chosen by more than T tokens
        return torch.ones_like(indices, dtype=torch.bool)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=indices.device)
    routing_map.scatter_(1, indices, True)  # [T, E]
    if policy == "position":
        rank = torch.cumsum(routing_map.to(torch.int32), dim=0) - 1  # position within the expert
        keep_map = routing_map & (rank < capacity)
    elif policy == "probs":
        dense = torch.zeros(num_tokens, num_experts, dtype=weights.dtype, device=weights.device)
        dense.scatter_(1, indices, weights.detach())
        dense = dense.masked_fill(~routing_map, -1.0)  # unchosen pairs never win a slot
        top = torch.topk(dense, capacity, dim=0).indices  # [capacity, E]
        keep_map = torch.zeros_like(routing_map).scatter_(0, top, True) & routing_map
    else:
        raise ValueError(f"capacity_keep_mask: policy={policy!r}; expected 'probs' or 'position'")
    return keep_map.gather(1, indices)  # [T, k]
