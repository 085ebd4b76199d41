"""Calibration data for quantizing an MoE model: MoEQuant's Expert-Balanced Self-Sampling (EBSS)
and the usual random windows of a corpus.

Why: GPTQ estimates each expert's Hessian from the calibration tokens routed to that expert. Text
from a corpus routes unevenly, so rarely chosen experts see few tokens and get a poor Hessian.
MoEQuant (Hu et al., ICML 2025) lets the model write its own calibration text and steers the
writing towards sequences that are both likely under the model and spread evenly over the experts.

Expert balance (paper Eq. 3-4). For MoE layer l with E experts let u_l^e be the fraction of the
layer's assignments that went to expert e (its usage frequency) and ``mean_l`` their mean (1/E).
The layer's imbalance is the sample standard deviation
``sigma_l = sqrt(sum_e (u_l^e - mean_l)^2 / (E - 1))`` and the model's is the mean over the MoE
layers, ``sigma = (1/L) sum_l sigma_l`` (:func:`expert_balance_sigma`; 0 when perfectly balanced).

Objective (Eq. 9-10). Among candidate data sets D, minimise ``PPL(D) * exp(sigma(D) / tau)``, or in
logs the mean negative log-likelihood plus ``sigma / tau``; tau trades fluency against balance.

Search (Eq. 11-14, Algorithm 1). A sequence starts from one first token and grows by a
deterministic beam search of ``width`` branches. A branch S of length l carries its cumulative
log-likelihood ``R_S = sum_t log P(S_t | S_<t)`` (Eq. 11; the first token adds nothing). Every
branch is extended by every vocabulary token v and the extension is scored (Eq. 13)

    score(S || v) = -(R_S + log P(v | S)) / (l + 1) + sigma(S) / tau

where sigma(S) is the balance of the *parent* S's own expert usage over all its tokens and all
MoE layers. Using the parent's usage rather than that of S || v (the "deferred imbalance") means
one forward per branch and step instead of one per candidate token. The ``width`` lowest scores
over all (branch, v) pairs survive (Eq. 14; the paper writes arg max, but the score is a loss, and
minimising it is the reading consistent with Eq. 10), until the sequence is ``seq_len`` long; the
lowest-scoring final branch is the output.

Several ks (a self-slimmable model served at more than one k): the score averages both terms over
the ks, ``mean_k NLL_k + mean_k sigma_k / tau`` (:func:`ebss_search`).

Implementation: all branches of all sequences form one batch of ``num_sequences * width`` rows
that decodes with a KV cache, so a step costs one position per branch. When branches are selected
the caches, the usage counts ``[L, E]`` of each branch (updated from each MoE layer's
``last_routing`` of the new position) and ``R_S`` are reordered by the parent index. Every
operation on a row depends only on that row (per-row attention and, in eval mode without capacity
limits, per-token routing and expert MLPs), so a sequence's output depends only on its first token:
the shards of one job (:func:`ebss_first_tokens` sliced per shard) give the same data as one run.
This is tested bit for bit on CPU. With ``capacity_factor`` set, which tokens are dropped depends
on the whole batch, and so would the data; on GPUs, GEMM kernels chosen by batch size may round
differently and flip near-ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from moe.errors import UserError
from moe.metrics import moe_layers
from moe.model import KVCache
from moe.runtime import set_active_experts

__all__ = [
    "EBSSResult",
    "default_calibration_size",
    "ebss_first_tokens",
    "ebss_generate",
    "ebss_search",
    "expert_balance_sigma",
    "expert_usage",
    "random_windows",
]

PAPER_WIDTH = 4
PAPER_TAU = 1.2
PAPER_NUM_SEQUENCES = 128
PAPER_SEQ_LEN = 512
SAMPLES_PER_HESSIAN_DIM = 8
"""Tokens per input dimension an expert's Hessian should see (the small-model rule below)."""


def _moe_layer_list(model: nn.Module, what: str) -> list:
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} contains no MoE layer")
    return layers


def _assignment_counts(layer, width: int) -> torch.Tensor:
    """``[T, width]`` int64: how many of its k choices each token of the layer's last forward gave
    each expert (zeros past the layer's own E when layers differ in E)."""
    indices = layer.last_routing.indices  # [T, k]
    counts = torch.zeros(indices.shape[0], width, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(1, indices, torch.ones_like(indices))


class _EvalNoGrad:
    """Eval mode and no autograd for the block; the previous mode is restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)
        return False


def expert_usage(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``[L_moe, E]`` int64 (``E`` the largest of any layer, zeros past a layer's own): how many
    token assignments each expert of each MoE layer (module order) gets when ``model`` runs ``input_ids [B, S]`` at its current k, ``batch_size`` sequences per
    forward (eval mode, no grad). Counts are the router's choices (``k`` per token), before any
    capacity dropping."""
    if input_ids.dim() != 2:
        raise ValueError(f"expert_usage: input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"expert_usage: batch_size must be >= 1, got {batch_size}")
    layers = _moe_layer_list(model, "expert_usage")
    device = next(model.parameters()).device
    total = torch.zeros(len(layers), max(layer.num_experts for layer in layers), dtype=torch.int64)
    with _EvalNoGrad(model):
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids[start : start + batch_size].to(device))
            for i, layer in enumerate(layers):
                indices = layer.last_routing.indices.flatten().cpu()
                total[i, : layer.num_experts] += torch.bincount(indices, minlength=layer.num_experts)
    return total


def _sigma_rows(counts: torch.Tensor, experts_per_layer=None) -> torch.Tensor:
    """Eq. 3-4 for a batch: ``counts [..., L, E]`` -> ``[...]`` float64 mean over layers of the
    sample standard deviation of each layer's usage frequencies (0 for an empty layer or E = 1).
    ``experts_per_layer``: each layer's own E when layers differ (columns past it are ignored)."""
    num_layers, width = counts.shape[-2], counts.shape[-1]
    widths = torch.tensor(experts_per_layer if experts_per_layer is not None else [width] * num_layers,
                          dtype=torch.float64, device=counts.device)  # [L]
    valid = (torch.arange(width, device=counts.device) < widths.unsqueeze(1)).double()  # [L, E]
    counts = counts.double() * valid
    usage = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)  # [..., L, E]
    mean = usage.sum(dim=-1, keepdim=True) / widths.unsqueeze(1)
    deviation = (usage - mean) * valid
    sigma_layer = (deviation.square().sum(dim=-1) / (widths - 1).clamp_min(1)).sqrt()  # [..., L]
    sigma_layer = torch.where(widths >= 2, sigma_layer, torch.zeros_like(sigma_layer))
    return sigma_layer.mean(dim=-1)


def expert_balance_sigma(counts: torch.Tensor, experts_per_layer=None) -> float:
    """MoEQuant's expert-balance metric (Eq. 3-4) of usage counts ``[L, E]``: per layer the sample
    standard deviation (divisor E - 1) of the usage frequencies ``counts / counts.sum()``, averaged
    over the layers. 0 when every expert is used equally, when a layer is empty and when E = 1.
    ``experts_per_layer``: each layer's own E when layers differ (``counts`` padded with zeros)."""
    counts = torch.as_tensor(counts)
    if counts.dim() != 2 or counts.shape[0] == 0:
        raise ValueError(f"expert_balance_sigma: counts must be [layers >= 1, experts], got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("expert_balance_sigma: counts must be non-negative")
    return float(_sigma_rows(counts, experts_per_layer))


def ebss_first_tokens(num_sequences: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``[num_sequences]`` int64 first tokens drawn uniformly from the vocabulary (Algorithm 1's
    ``Random(V)``) by a CPU generator seeded with ``seed``. Shards of one job slice this one draw."""
    _check_positive("num_sequences", num_sequences)
    _check_positive("vocab_size", vocab_size)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, vocab_size, (num_sequences,), generator=generator, dtype=torch.int64)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}={value!r} is invalid: expected an integer >= 1")


def _lowest(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) ``[R, count]`` of the ``count`` lowest entries of each row of ``scores``,
    ascending; ties are broken by the lower index, so the choice never depends on the sort kernel."""
    kth = torch.topk(scores, count, dim=1, largest=False).values.max(dim=1, keepdim=True).values  # [R, 1]
    below = scores < kth
    missing = count - below.sum(dim=1, keepdim=True)  # how many entries equal to kth to take
    at_kth = scores == kth
    take = below | (at_kth & (at_kth.cumsum(dim=1) <= missing))  # exactly `count` per row
    indices = take.nonzero()[:, 1].view(scores.shape[0], count)  # ascending index within a row
    values = scores.gather(1, indices)
    order = torch.sort(values, dim=1, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


@dataclass
class EBSSResult:
    """The output of :func:`ebss_search`: the best branch of each sequence and its bookkeeping."""

    tokens: torch.Tensor
    """[N, seq_len] int64 token ids (CPU)."""
    log_likelihood: torch.Tensor
    """[N] float64: R_S of the returned sequence, sum over tokens 2.. of log P(token | prefix) (with
    several ks, the mean over the ks of that sum)."""
    score: torch.Tensor
    """[N] float64: the Eq. 13 score with which the last token was chosen (for seq_len 1, sigma/tau
    of the first token's usage)."""
    parent_sigma: torch.Tensor
    """[N] float64: sigma (Eq. 3-4) of the returned sequence without its last token (the term in
    ``score``; the first token alone when seq_len is 1; with several ks, the mean over the ks)."""
    branches: torch.Tensor
    """[N, width, seq_len] int64: every final branch of each sequence, best first (``tokens`` is
    ``branches[:, 0]``); for seq_len 1 the ``width`` copies of the first token."""
    branch_scores: torch.Tensor
    """[N, width] float64: the score of each final branch, ascending."""


def ebss_search(
    model: nn.Module,
    num_sequences: int,
    seq_len: int,
    width: int = PAPER_WIDTH,
    tau: float = PAPER_TAU,
    first_tokens: Optional[torch.Tensor] = None,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    ks: Optional[Sequence[Union[int, Sequence[int]]]] = None,
) -> EBSSResult:
    """:func:`ebss_generate` with the score, the log-likelihood and the parent's sigma of each
    returned sequence (what the tests check against a naive recomputation).

    ``ks``: the active-expert counts the data must serve (each one k for every layer, or a list of
    one k per layer, as :func:`moe.set_active_experts` takes); None: the model's current k. With
    several, every branch is decoded at each k (one KV cache and one usage count per k) and the
    Eq. 13 score uses the mean over the ks of its two terms: the mean log-likelihood
    ``R_S = mean_k sum_t log P_k(S_t | S_<t)`` and the mean balance ``mean_k sigma_k(S)``. That is
    Eq. 10's objective averaged over the deployments, ``mean_k [NLL_k + sigma_k / tau]``: a set
    fluent and balanced at every listed k, with tau meaning what it means at one k (a sum would
    scale it by the number of ks). The model's ks are restored afterwards."""
    config = model.config
    vocab_size, max_seq_len = config.vocab_size, config.max_seq_len
    _check_positive("num_sequences", num_sequences)
    _check_positive("width", width)
    _check_positive("seq_len", seq_len)
    if seq_len > max_seq_len:
        raise UserError(f"seq_len={seq_len} is invalid: it must be <= the model's max_seq_len ({max_seq_len})")
    if width > vocab_size:
        raise UserError(f"width={width} is invalid: it must be <= the vocabulary size ({vocab_size})")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
        raise UserError(f"tau={tau!r} is invalid: expected a number > 0")
    if first_tokens is None:
        first_tokens = ebss_first_tokens(num_sequences, vocab_size, seed)
    first_tokens = torch.as_tensor(first_tokens)
    if first_tokens.shape != (num_sequences,) or first_tokens.is_floating_point():
        raise UserError(
            f"first_tokens must be an integer tensor of shape [num_sequences={num_sequences}], "
            f"got {first_tokens.dtype} {tuple(first_tokens.shape)}"
        )
    if not (0 <= int(first_tokens.min()) and int(first_tokens.max()) < vocab_size):
        raise UserError(f"first_tokens must lie in 0..{vocab_size - 1} (the vocabulary)")

    layers = _moe_layer_list(model, "ebss_generate")
    device = next(model.parameters()).device
    rows = num_sequences * width
    row_offset = torch.arange(num_sequences, device=device).unsqueeze(1) * width  # [N, 1]
    inverse_tau = 0.0 if math.isinf(tau) else 1.0 / tau

    widths = [layer.num_experts for layer in layers]  # per layer: they may differ (PR-MoE)
    runs = [None] if ks is None else list(ks)  # None: the model's current k, left untouched
    if not runs:
        raise UserError("ks is empty: expected at least one active-expert count")
    saved_ks = [layer.active_experts for layer in layers]

    def usage_of_last_forward() -> torch.Tensor:  # [rows, L, max E]
        return torch.stack([_assignment_counts(layer, max(widths)) for layer in layers], dim=1)

    def forward(run: int, input_ids: torch.Tensor) -> torch.Tensor:  # [rows, V], at run's k
        if runs[run] is not None:
            set_active_experts(model, runs[run])
        return model(input_ids, cache=caches[run])[:, -1].float()

    def mean_over_runs(values: list) -> torch.Tensor:
        return values[0] if len(values) == 1 else torch.stack(values).mean(dim=0)

    def balance() -> torch.Tensor:  # [rows]: sigma of each branch, averaged over the ks
        return mean_over_runs([_sigma_rows(u, widths) for u in usage])

    try:
        with _EvalNoGrad(model):
            tokens = first_tokens.to(device=device, dtype=torch.int64).repeat_interleave(width).unsqueeze(1)  # [rows, 1]
            caches = [KVCache(len(model.blocks)) for _ in runs]
            logits, usage = [], []  # per k: [rows, V], [rows, L, E] (the first token's usage)
            for run in range(len(runs)):
                logits.append(forward(run, tokens))
                usage.append(usage_of_last_forward())
            log_likelihood = torch.zeros(rows, dtype=torch.float64, device=device)  # R_S
            parent_sigma = balance()
            best_score = parent_sigma * inverse_tau
            if progress is not None:
                progress(1, seq_len)
            for length in range(1, seq_len):  # every branch has `length` tokens
                log_probs = mean_over_runs([torch.log_softmax(lg, dim=-1).double() for lg in logits])  # [rows, V]
                parent_sigma = balance()  # [rows]
                scores = (log_likelihood.unsqueeze(1) + log_probs) / -(length + 1) + (parent_sigma * inverse_tau).unsqueeze(1)
                scores = scores.view(num_sequences, width, vocab_size)
                if length == 1 and width > 1:  # the branches are one and the same token: expand only the first
                    scores[:, 1:] = math.inf
                best_score, chosen = _lowest(scores.view(num_sequences, width * vocab_size), width)  # [N, w]
                parent = (chosen // vocab_size + row_offset).flatten()  # [rows]
                new_token = (chosen % vocab_size).flatten()  # [rows]
                log_likelihood = log_likelihood[parent] + log_probs[parent, new_token]
                parent_sigma = parent_sigma[parent]
                usage = [u[parent] for u in usage]
                tokens = torch.cat([tokens[parent], new_token.unsqueeze(1)], dim=1)
                if length + 1 < seq_len:
                    for run, cache in enumerate(caches):
                        if width > 1:
                            for layer_cache in cache.layers:
                                layer_cache.keys = layer_cache.keys.index_select(0, parent)
                                layer_cache.values = layer_cache.values.index_select(0, parent)
                        logits[run] = forward(run, new_token.unsqueeze(1))
                        usage[run] += usage_of_last_forward()
                if progress is not None:
                    progress(length + 1, seq_len)
    finally:
        if ks is not None:
            set_active_experts(model, saved_ks)
    branch_scores = best_score.reshape(num_sequences, width).double().cpu()
    first_of_each = torch.arange(num_sequences, device=device) * width  # the lowest score of each sequence
    return EBSSResult(
        tokens=tokens[first_of_each].cpu(),
        log_likelihood=log_likelihood[first_of_each].cpu(),
        score=branch_scores[:, 0].clone(),
        parent_sigma=parent_sigma[first_of_each].cpu(),
        branches=tokens.view(num_sequences, width, -1).cpu(),
        branch_scores=branch_scores.clone(),
    )


def ebss_generate(
    model: nn.Module,
    num_sequences: int,
    seq_len: int,
    width: int = PAPER_WIDTH,
    tau: float = PAPER_TAU,
    first_tokens: Optional[torch.Tensor] = None,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    ks: Optional[Sequence[Union[int, Sequence[int]]]] = None,
) -> torch.Tensor:
    """``[num_sequences, seq_len]`` int64 calibration sequences written by ``model`` itself with
    Expert-Balanced Self-Sampling (module docstring; paper defaults ``width`` 4, ``tau`` 1.2).

    ``first_tokens [num_sequences]``: the first token of each sequence (default
    :func:`ebss_first_tokens` with ``seed``). The search is deterministic and a sequence depends
    only on its first token, so shards of a job may split ``first_tokens`` between them. The model
    runs at its current k (or at each of ``ks``, the score averaged over them: :func:`ebss_search`),
    in eval mode, without autograd. ``progress(step, total)`` is called after each of the
    ``seq_len`` positions.
    """
    return ebss_search(model, num_sequences, seq_len, width, tau, first_tokens, seed, progress, ks).tokens


def random_windows(tokens, num_sequences: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[num_sequences, seq_len]`` int64: GPTQ's usual calibration set, windows of a token stream
    (1-D tensor or numpy array/memmap) starting at offsets drawn uniformly from
    ``0 .. len - seq_len - 1`` by a generator seeded with ``seed``."""
    _check_positive("num_sequences", num_sequences)
    _check_positive("seq_len", seq_len)
    if len(tokens.shape) != 1:
        raise ValueError(f"random_windows: tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    length = tokens.shape[0]
    if length < seq_len + 1:
        raise UserError(f"random_windows: the token stream ({length} tokens) is shorter than seq_len + 1 ({seq_len + 1})")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    offsets = torch.randint(0, length - seq_len, (num_sequences,), generator=generator).tolist()
    if isinstance(tokens, torch.Tensor):
        return torch.stack([tokens[o : o + seq_len].to(torch.int64).cpu() for o in offsets])
    windows = np.stack([np.asarray(tokens[o : o + seq_len]) for o in offsets]).astype(np.int64)
    return torch.from_numpy(windows)


def default_calibration_size(model: nn.Module) -> tuple[int, int]:
    """``(num_sequences, seq_len)`` of a calibration set sized to the model.

    - ``seq_len = min(512, max_seq_len)`` (the paper's 512, or the model's whole context).
    - An expert gets on average ``T * k / E`` of T calibration tokens, and its largest Hessian is
      ``max(d, f)`` square (the down projection reads f inputs). For that Hessian to be well
      conditioned, every expert should see about ``8 * max(d, f)`` tokens, so the set needs
      ``T >= (E / k) * 8 * max(d, f)`` tokens, rounded up to whole sequences.
    - Capped at the paper's 128 sequences: big models reach the cap (128 x 512 tokens, as in
      GPTQ and MoEQuant); small ones use fewer and calibrate faster.

    k is the current ``active_experts`` of the first MoE layer; d and f are ``config.moe``'s
    ``hidden_size`` and ``ffn_hidden_size``.
    """
    layers = _moe_layer_list(model, "default_calibration_size")
    moe_config = model.config.moe
    seq_len = min(PAPER_SEQ_LEN, model.config.max_seq_len)
    k = layers[0].active_experts
    tokens_needed = moe_config.max_experts / k * SAMPLES_PER_HESSIAN_DIM * max(moe_config.hidden_size, moe_config.ffn_hidden_size)
    num_sequences = min(PAPER_NUM_SEQUENCES, max(1, math.ceil(tokens_needed / seq_len)))
    return num_sequences, seq_len

