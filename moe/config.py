"""Configuration of one MoE layer.

Every field has a docstring (the string literal under it) and is validated in ``__post_init__``: a
bad value raises ``ValueError`` naming the field, the value and what is allowed. YAML sections map
onto these fields one to one (see :meth:`MoEConfig.from_dict`); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

from moe.validation import check_bool, check_choice, check_int, check_number, fail, from_dict

ROUTERS = ("learned", "random")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BALANCES = ("none", "aux_loss", "bias")
BIAS_UPDATE_SCHEDULES = ("constant", "inverse_time")
BIAS_UPDATE_MODES = ("sign", "proportional")
DROP_POLICIES = ("probs", "position")
ACTIVATIONS = ("swiglu", "gelu", "relu")
K_SCHEDULES = ("constant", "linear", "cosine", "exponential", "multistep")
EXPERT_BACKENDS = ("auto", "triton", "torch", "loop", "gather")  # kernels.expert_mlp.EXPERT_BACKENDS (tested)


_OWNER = "MoEConfig"


def _fail(field: str, value: Any, allowed: str) -> None:
    fail(_OWNER, field, value, allowed)


@dataclass
class MoEConfig:
    """One MoE feed-forward layer: router, balancing, capacity, experts and the k schedule."""

    hidden_size: int = 256
    """Model width d: size of each token's input and output vector."""

    ffn_hidden_size: int = 512
    """Hidden width f of each expert MLP (w1/w3 are [E, d, f], w2 is [E, f, d])."""

    num_experts: Union[int, list] = 8
    """Number of routed experts E; or one count per MoE block, first to last (DeepSpeed-MoE's PR-MoE
    pyramid, e.g. ``[4, 4, 8, 8]``). With a list, ``top_k``, ``k_min`` and ``k_max`` may go up to the
    largest E and each block takes ``min(k, its E)`` (:meth:`for_block`)."""

    num_shared_experts: int = 0
    """Shared experts (DeepSeekMoE): always active for every token, beside the k routed ones, and
    run as one dense SwiGLU MLP of width ``num_shared_experts * shared_ffn_hidden_size`` whose
    output is added to the routed experts' (never dispatched; data-parallel under expert
    parallelism). 1 shared expert with k = 1 is DeepSpeed-MoE's Residual-MoE (a dense MLP plus one
    routed expert as a correction; DeepSpeed also learns a per-token mix of the two, this sums them)."""

    shared_ffn_hidden_size: Optional[int] = None
    """Hidden width of each shared expert (default: ffn_hidden_size)."""

    top_k: int = 2
    """Active experts per token when ``k_schedule`` is "constant"; the run-time k can be changed
    with ``moe.set_active_experts`` (1..E) without touching the weights."""

    router: str = "learned"
    """"learned": trainable linear gate. "random": SMoE-Dropout's gate, drawn N(0, router_init_std)
    from ``router_seed`` and frozen (a buffer: no gradient, never in the optimizer, checkpointed)."""

    score_function: str = "softmax"
    """How logits become scores: "softmax" over all E experts, or an independent "sigmoid"."""

    normalize_topk: bool = True
    """Renormalise the k selected scores to sum to 1. With softmax this equals SMoE-Dropout's
    softmax over the selected logits; DeepSeek-V3 normalises sigmoid scores."""

    balance: str = "none"
    """Load balancing: "none", "aux_loss" (Switch/GShard E * sum_i f_i P_i, scaled by
    ``aux_loss_coeff``) or "bias" (auxiliary-loss-free: a per-expert bias that only steers the
    top-k selection, moved once per optimizer step by ``moe.update_expert_biases``)."""

    aux_loss_coeff: float = 1e-2
    """Coefficient of the auxiliary load-balancing loss (used when ``balance`` is "aux_loss")."""

    z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(logits)^2); 0 disables it."""

    mi_loss_coeff: float = 0.0
    """Coefficient of ModuleFormer's mutual-information router loss H(m|x) - H(m) (Shen et al.
    2023; ``moe.balance.mutual_information_loss``); 0 disables it. Minimising it balances the load
    over the batch (high entropy H(m) of the mean routing distribution) while each token
    concentrates on few experts (low mean entropy H(m|x) of its own distribution). Usable with any
    ``balance`` and beside the z-loss; it acts through the router's gradient, so it needs
    router="learned" (a nonzero value with router="random" is an error)."""

    bias_update_rate: float = 1e-3
    """Step size u of the bias update (DeepSeek's default 1e-3)."""

    bias_update_schedule: str = "constant"
    """Rate over updates t: "constant" (u) or "inverse_time" (u / (1 + t / bias_update_t0))."""

    bias_update_t0: float = 1000.0
    """Time constant of the "inverse_time" bias-rate schedule, in bias updates."""

    bias_update_mode: str = "sign"
    """"sign": bias += u * sign(mean - count) (DeepSeek). "proportional": bias += u * (mean -
    count) / mean, the relative load error, so u means the same at any batch size."""

    capacity_factor: Optional[float] = None
    """None: dropless (the default). Otherwise each expert takes at most
    ceil(T * k / E * capacity_factor) tokens per forward; the rest are dropped and counted."""

    drop_policy: str = "probs"
    """Which tokens an over-full expert keeps: "probs" (highest gate weight) or "position"
    (earliest tokens)."""

    activation: str = "swiglu"
    """Expert MLP activation: "swiglu" (silu(x w1) * (x w3)) w2, "gelu" or "relu" (w3 unused)."""

    router_init_std: float = 0.02
    """Standard deviation of the router weight's normal initialisation (learned and random)."""

    router_seed: int = 0
    """Seed of the fixed random router; each layer draws from (router_seed, layer index), so every
    rank builds the same router without communication."""

    expert_backend: str = "auto"
    """Expert MLP backend: "auto" (per call, the path measured fastest for the inputs' device and
    shapes: kernels.expert_mlp.choose_backend), "triton" (this project's Triton kernels on CUDA; on
    CPU the "torch" backend, silently), "torch" (F.grouped_mm where supported; the C++ CPU kernel),
    "gather" (weights gathered per row: decoding a few tokens) or "loop"."""

    k_schedule: str = "constant"
    """How k moves during training: "constant" (top_k), or from k_min to k_max over
    k_schedule_steps by "linear", "cosine", "exponential" (geometric) or "multistep" (doubling)."""

    k_min: Optional[int] = None
    """First k of a non-constant schedule (defaults to top_k)."""

    k_max: Optional[int] = None
    """Last k of a non-constant schedule (defaults to num_experts)."""

    k_schedule_steps: int = 1000
    """Optimizer steps over which a non-constant schedule goes from k_min to k_max."""

    a2a_overlap_chunks: int = 1
    """Expert parallelism only: split each MoE layer's token exchange into this many chunks of local
    experts, so the all-to-all of one chunk runs while the experts compute another, forward and
    backward (``parallel.dispatcher``). 1: one exchange each way (the serial path). At most E/P
    chunks are used (one per local expert); ignored without expert parallelism."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "top_k", "k_schedule_steps"):
            check_int(_OWNER, name, getattr(self, name))
        if isinstance(self.num_experts, (list, tuple)):
            self.num_experts = list(self.num_experts)
            if not self.num_experts or any(isinstance(e, bool) or not isinstance(e, int) or e < 1
                                           for e in self.num_experts):
                _fail("num_experts", self.num_experts, "expected an integer >= 1, or a non-empty list of them "
                      "(one per MoE block)")
        else:
            check_int(_OWNER, "num_experts", self.num_experts)
        check_int(_OWNER, "num_shared_experts", self.num_shared_experts, minimum=0)
        if self.shared_ffn_hidden_size is not None:
            check_int(_OWNER, "shared_ffn_hidden_size", self.shared_ffn_hidden_size)
        if self.top_k > self.max_experts:
            _fail("top_k", self.top_k, f"expected 1 <= top_k <= num_experts ({self.max_experts})")
        check_choice(_OWNER, "router", self.router, ROUTERS)
        check_choice(_OWNER, "score_function", self.score_function, SCORE_FUNCTIONS)
        check_bool(_OWNER, "normalize_topk", self.normalize_topk)
        check_choice(_OWNER, "balance", self.balance, BALANCES)
        for name in ("aux_loss_coeff", "z_loss_coeff", "mi_loss_coeff", "bias_update_rate", "router_init_std"):
            check_number(_OWNER, name, getattr(self, name))
        if self.mi_loss_coeff > 0 and self.router != "learned":
            _fail("mi_loss_coeff", self.mi_loss_coeff,
                  f"expected 0 with router={self.router!r}: the fixed random gate gets no gradient, so the "
                  "mutual-information loss would do nothing; use router='learned' or mi_loss_coeff=0")
        check_choice(_OWNER, "bias_update_schedule", self.bias_update_schedule, BIAS_UPDATE_SCHEDULES)
        check_number(_OWNER, "bias_update_t0", self.bias_update_t0, strict=True)
        check_choice(_OWNER, "bias_update_mode", self.bias_update_mode, BIAS_UPDATE_MODES)
        if self.capacity_factor is not None:
            bad = isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float))
            if bad or not self.capacity_factor > 0 or self.capacity_factor == float("inf"):
                _fail("capacity_factor", self.capacity_factor, "expected a finite number > 0, or null for dropless")
        check_choice(_OWNER, "drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice(_OWNER, "activation", self.activation, ACTIVATIONS)
        check_int(_OWNER, "router_seed", self.router_seed, minimum=0)
        check_choice(_OWNER, "expert_backend", self.expert_backend, EXPERT_BACKENDS)
        check_choice(_OWNER, "k_schedule", self.k_schedule, K_SCHEDULES)
        check_int(_OWNER, "a2a_overlap_chunks", self.a2a_overlap_chunks)
        self._validate_k_range()

    def _validate_k_range(self) -> None:
        if self.k_min is None:
            self.k_min = self.top_k
        if self.k_max is None:
            self.k_max = self.max_experts if self.k_schedule != "constant" else self.top_k
        for name in ("k_min", "k_max"):
            check_int(_OWNER, name, getattr(self, name))
            if getattr(self, name) > self.max_experts:
                _fail(name, getattr(self, name), f"expected at most num_experts ({self.max_experts})")
        if self.k_min > self.k_max:
            _fail("k_min", self.k_min, f"expected k_min <= k_max ({self.k_max})")

    @property
    def per_block(self) -> bool:
        """True when ``num_experts`` is a list: one count per MoE block."""
        return isinstance(self.num_experts, list)

    @property
    def max_experts(self) -> int:
        """The largest E of any block (E itself when every block has E experts)."""
        return max(self.num_experts) if self.per_block else self.num_experts

    def for_block(self, moe_index: int) -> "MoEConfig":
        """The config of the ``moe_index``-th MoE block (0-based, counting MoE blocks only): its own
        E, and top_k, k_min, k_max capped at that E. The config itself when E is one number."""
        if not self.per_block:
            return self
        if not 0 <= moe_index < len(self.num_experts):
            raise ValueError(f"MoEConfig.for_block: MoE block {moe_index} of {len(self.num_experts)} "
                             f"(num_experts={self.num_experts})")
        experts = self.num_experts[moe_index]
        return dataclasses.replace(self, num_experts=experts, top_k=min(self.top_k, experts),
                                   k_min=min(self.k_min, experts), k_max=min(self.k_max, experts))

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared experts' MLP (0 without shared experts)."""
        return self.num_shared_experts * (self.shared_ffn_hidden_size or self.ffn_hidden_size)

    @property
    def uses_bias(self) -> bool:
        """True when the auxiliary-loss-free bias steers expert selection."""
        return self.balance == "bias"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MoEConfig":
        """Build from a mapping (a YAML section); unknown keys raise ``ValueError`` naming them."""
        return from_dict(cls, values)

    def to_dict(self) -> dict:
        return asdict(self)
