"""A deliberately naive MoE forward: Python loops over tokens and experts, written independently
of moe/ (no topk, no sort, no grouped GEMM), used as the reference the layer is held to."""

from __future__ import annotations

import math

import torch


def _act(name: str, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
    if name == "swiglu":
        return h1 * torch.sigmoid(h1) * h3
    if name == "gelu":
        return 0.5 * h1 * (1.0 + torch.erf(h1 / math.sqrt(2.0)))
    return torch.clamp(h1, min=0.0)


def naive_route(x, weight, k, score_function="softmax", normalize=True, bias=None):
    """Per-token: scores over all experts, pick the k best by score + bias one at a time."""
    choices, gates = [], []
    for t in range(x.shape[0]):
        logits = [torch.dot(x[t].float(), weight[e].float()) for e in range(weight.shape[0])]
        logits = torch.stack(logits)
        if score_function == "softmax":
            scores = torch.exp(logits - logits.max())
            scores = scores / scores.sum()
        else:
            scores = 1.0 / (1.0 + torch.exp(-logits))
        select = [float(scores[e].detach()) + (float(bias[e]) if bias is not None else 0.0) for e in range(len(scores))]
        picked = []
        for _ in range(k):
            best = max((e for e in range(len(select)) if e not in picked), key=lambda e: select[e])
            picked.append(best)
        chosen = torch.stack([scores[e] for e in picked])
        if normalize:
            chosen = chosen / chosen.sum()
        choices.append(picked)
        gates.append(chosen)
    return choices, gates


def naive_moe(x, weight, w1, w2, w3, k, activation="swiglu", score_function="softmax", normalize=True,
              bias=None, kept=None):
    """y[t] = sum over the token's kept choices j of gate_j * expert_{e_j}(x[t])."""
    choices, gates = naive_route(x, weight, k, score_function, normalize, bias)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j, e in enumerate(choices[t]):
            if kept is not None and not bool(kept[t][j]):
                continue
            h1 = x[t] @ w1[e]
            h3 = x[t] @ w3[e] if w3 is not None else None
            acc = acc + gates[t][j].to(x.dtype) * (_act(activation, h1, h3) @ w2[e])
        rows.append(acc)
    return torch.stack(rows), choices
