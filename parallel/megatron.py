"""SMoE-Dropout inside Megatron-core: our router behind Megatron-core's router interface.

Megatron-core's ``MoELayer`` (0.16) builds its router from the spec field
``MoESubmodules.router``, a *router builder*: any callable ``builder(config=..., pg_collection=...)``
that returns a module with ``forward(hidden_states, padding_mask=None) -> (probs [T, E],
routing_map [T, E] bool)`` and ``set_layer_number(n)`` (its ``RouterInterface`` protocol). This
module provides such a router, :class:`SMoEDropoutRouter`, which *is* our :class:`moe.TopKRouter`
(a subclass, so the gate, the bias and the counts are ours by construction) answering Megatron's
interface:

- the fixed random gate of SMoE-Dropout: a persistent fp32 buffer drawn from
  ``(router_seed, layer_number - 1)`` exactly as ``moe.TopKRouter(config, layer_idx)`` draws it
  (Megatron's ``layer_number`` is 1-based over all layers, dense ones and pipeline offset included;
  ``moe.MoETransformer``'s ``layer_idx`` is the 0-based block index: the same layer gets the same
  gate). It is not a Parameter: Megatron's DDP and optimizer never see it. It is redrawn when the
  transformer layer calls ``set_layer_number``; it stays fp32 through ``Float16Module``'s cast.
- the run-time k: ``router.active_experts`` (set by :func:`set_active_experts` or
  :func:`advance_k_schedule`, the same schedule as ``moe.advance_k_schedule``);
- our bias balancing: selection by ``score + expert_bias``, weights from the unbiased scores
  renormalised over the k, token counts accumulated in training mode (padding tokens excluded) and
  the bias moved by :func:`update_expert_biases` with ``moe.balance.updated_expert_bias`` (every
  ``bias_update_mode`` and ``bias_update_schedule`` of :class:`moe.MoEConfig`);
- capacity dropping, the auxiliary loss and the z-loss of ``moe.TopKRouter``, the losses attached
  to the probs with Megatron's ``MoEAuxLossAutoScaler`` as its own router does.

Why not Megatron's own bias balancing (``moe_router_enable_expert_bias``)? Megatron accepts it only
with sigmoid scores (SMoE-Dropout routes with softmax), supports only the sign rule at a constant
rate, and its update hook in ``finalize_model_grads`` moves *every* module that has an
``expert_bias``: with both enabled the bias would move twice. So this router keeps ours (for
sigmoid/sign/constant the formula is bit-identical to Megatron's ``get_updated_expert_bias``,
tests/moe/test_peer_parity.py) and refuses a config with Megatron's flag on. The counts are summed
over the same group Megatron uses (tensor x data x context parallel) and the update can be hooked
into Megatron's ``finalize_model_grads_func``, where Megatron moves its own bias
(:func:`finalize_model_grads_with_bias_update`).

Why not a subclass of Megatron's ``TopKRouter``? Its constructor allocates a trainable gate
Parameter and CUDA buffers, and every one of its methods would be overridden; the builder protocol
is the interface Megatron's ``MoELayer`` actually uses, so this router implements that.

Varying k inside Megatron: the dropless "alltoall" and "allgather" dispatchers take any number of
experts per token when ``moe_permute_fusion`` is off; with the fused permute, and for the capacity
helpers, they read ``config.moe_router_topk``, which :func:`set_active_experts` keeps equal to the
router's k when every layer has the same k. The "flex" dispatcher fixes k at construction.
:meth:`SMoEDropoutRouter.forward` raises a clear error where the run-time k cannot be honoured.

For a Megatron-LM user::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from moe import MoEConfig
    from parallel import megatron as smoe

    moe_config = MoEConfig(hidden_size=1024, ffn_hidden_size=2816, num_experts=16, top_k=2,
                           router="random", k_schedule="linear", k_min=1, k_max=16,
                           k_schedule_steps=10_000, balance="bias")
    config = TransformerConfig(num_layers=24, num_attention_heads=16,
                               **smoe.megatron_config_fields(moe_config))
    # or, from an existing TransformerConfig (argparse): moe_config =
    #     smoe.moe_config_from_megatron(config, router="random", k_schedule="linear", ...)
    spec = smoe.with_random_router(get_gpt_layer_local_spec(num_experts=16), moe_config)
    model = GPTModel(config, transformer_layer_spec=spec, ...)
    # (or build with the stock spec and call smoe.install_random_router(model, moe_config)
    #  before wrapping the model in DDP and building the optimizer)
    config.finalize_model_grads_func = smoe.finalize_model_grads_with_bias_update(
        config.finalize_model_grads_func)          # after Megatron-LM has set it
    for iteration in range(start, train_iters):
        smoe.advance_k_schedule(model, iteration)  # k of SMoE-Dropout's schedule
        train_step(...)                            # the bias moves in finalize_model_grads

Megatron is imported lazily: ``import parallel.megatron`` works without megatron-core installed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.balance import updated_expert_bias
from moe.config import MoEConfig
from moe.devices import on_collective_device
from moe.errors import UserError
from moe.routers import TopKRouter, expert_counts
from moe.schedules import k_at_step

__all__ = [
    "RandomRouterBuilder",
    "SMoEDropoutRouter",
    "advance_k_schedule",
    "check_megatron_config",
    "finalize_model_grads_with_bias_update",
    "install_random_router",
    "megatron_config_fields",
    "megatron_routers",
    "moe_config_from_megatron",
    "set_active_experts",
    "update_expert_biases",
    "with_random_router",
]

_ACTIVATIONS = {"swiglu": (True, F.silu), "gelu": (False, F.gelu), "relu": (False, F.relu)}

# TransformerConfig options this router cannot honour: (field, its off value, why).
_UNSUPPORTED = (
    ("moe_router_enable_expert_bias", False,
     "Megatron's own bias update would move this router's bias a second time; use balance='bias' in "
     "MoEConfig and parallel.megatron.update_expert_biases"),
    ("moe_router_num_groups", None, "group-limited routing is not implemented by this router"),
    ("moe_router_group_topk", None, "group-limited routing is not implemented by this router"),
    ("moe_router_topk_scaling_factor", None, "this router does not scale the gate weights"),
    ("moe_input_jitter_eps", None, "input jitter is not implemented by this router"),
    ("moe_router_force_load_balancing", False, "benchmark-only random logits are not supported"),
    ("moe_enable_routing_replay", False, "routing replay is not supported"),
    ("moe_pad_expert_input_to_capacity", False, "padding to capacity assumes a fixed k"),
    ("moe_router_padding_for_quantization", False, "not supported by this router"),
    ("moe_latent_size", None, "latent projections are not supported"),
)


def _megatron():
    """Megatron-core's pieces this module uses, imported on first use."""
    try:
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
        from megatron.core.transformer.spec_utils import ModuleSpec
    except ImportError as error:  # pragma: no cover - exercised only without megatron-core
        raise UserError(f"parallel.megatron needs megatron-core (pip install megatron-core): {error}") from error
    return dict(
        parallel_state=parallel_state,
        MoELayer=MoELayer,
        MoESubmodules=MoESubmodules,
        MoEAuxLossAutoScaler=MoEAuxLossAutoScaler,
        ModuleSpec=ModuleSpec,
    )


# --------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------


def megatron_config_fields(config: MoEConfig) -> dict:
    """The ``TransformerConfig`` fields that describe the same MoE layer as ``config`` (pass them
    as keyword arguments, next to num_layers, num_attention_heads, ...).

    The router fields (``moe_router_topk`` = the k at step 0, score function, capacity, losses) are
    what Megatron's dispatcher, experts and loss tracker read; the routing itself is this module's
    router's. ``moe_router_enable_expert_bias`` is False: the bias is ours (module docstring).
    The experts match ``moe.GroupedExperts``: no biases, SwiGLU = gated linear unit with SiLU.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"megatron_config_fields: expected a MoEConfig, got {type(config).__name__}")
    if config.per_block:
        raise UserError(f"MoEConfig.num_experts={config.num_experts} (one count per block) has no Megatron-core "
                        "equivalent: its num_moe_experts is one number for every MoE layer")
    if config.num_shared_experts:
        raise UserError("MoEConfig.num_shared_experts: map shared experts onto Megatron's own shared-expert MLP "
                        "(moe_shared_expert_intermediate_size); this router does not carry them")
    gated, activation = _ACTIVATIONS[config.activation]
    first_k = k_at_step(config, 0)
    # softmax: top-k of the logits then softmax over the k == softmax renormalised over the k.
    # Megatron's config check refuses k=1 without pre-softmax (a softmax over one logit has no
    # gradient); the field only configures Megatron's own router, which ours replaces, so say
    # "pre-softmax" there (moe_config_from_megatron then gives normalize_topk=False: pass it).
    pre_softmax = not config.normalize_topk or (config.score_function == "softmax" and first_k == 1)
    return dict(
        hidden_size=config.hidden_size,
        num_moe_experts=config.num_experts,
        moe_ffn_hidden_size=config.ffn_hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        moe_router_topk=first_k,
        moe_router_score_function=config.score_function,
        moe_router_pre_softmax=pre_softmax,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if config.balance == "aux_loss" else "none",
        moe_aux_loss_coeff=config.aux_loss_coeff if config.balance == "aux_loss" else 0.0,
        moe_z_loss_coeff=config.z_loss_coeff if config.z_loss_coeff > 0 else None,
        moe_router_enable_expert_bias=False,
        moe_router_bias_update_rate=config.bias_update_rate,
        moe_expert_capacity_factor=config.capacity_factor,
        moe_token_drop_policy=config.drop_policy,
        moe_pad_expert_input_to_capacity=False,
        gated_linear_unit=gated,
        activation_func=activation,
        add_bias_linear=False,
    )


def moe_config_from_megatron(transformer_config: Any, **overrides: Any) -> MoEConfig:
    """A :class:`moe.MoEConfig` for the MoE layers of ``transformer_config`` (a Megatron
    ``TransformerConfig``); ``overrides`` set what Megatron has no field for (``router="random"``,
    ``router_seed``, ``k_schedule``, ``k_min``, ``k_max``, ``k_schedule_steps``, ``balance="bias"``,
    ``bias_update_*``, ``router_init_std``) or replace a mapped value. Options with no counterpart
    raise ``UserError`` naming them."""
    tc = transformer_config
    if not getattr(tc, "num_moe_experts", None):
        raise UserError("moe_config_from_megatron: TransformerConfig.num_moe_experts is not set (no MoE layers)")
    problems = _unsupported_options(tc)
    aux_coeff, aux_problems = _megatron_aux_loss(tc)
    problems += aux_problems
    activation = _activation_name(tc)
    if activation is None:
        problems.append(f"activation_func={tc.activation_func!r} with gated_linear_unit={tc.gated_linear_unit} "
                        "(supported: SiLU gated (swiglu), GELU or ReLU ungated)")
    if problems:
        raise UserError("moe_config_from_megatron: options without a counterpart in MoEConfig: " + "; ".join(problems))
    values = dict(
        hidden_size=tc.hidden_size,
        ffn_hidden_size=tc.moe_ffn_hidden_size or tc.ffn_hidden_size,
        num_experts=tc.num_moe_experts,
        top_k=tc.moe_router_topk,
        score_function=tc.moe_router_score_function,
        # Megatron renormalises sigmoid scores over the k only when k > 1
        normalize_topk=(not tc.moe_router_pre_softmax if tc.moe_router_score_function == "softmax"
                        else tc.moe_router_topk > 1),
        balance="aux_loss" if aux_coeff > 0 else "none",
        aux_loss_coeff=float(aux_coeff),
        z_loss_coeff=float(tc.moe_z_loss_coeff or 0.0),
        bias_update_rate=float(tc.moe_router_bias_update_rate),
        capacity_factor=tc.moe_expert_capacity_factor,
        drop_policy=tc.moe_token_drop_policy,
        activation=activation,
    )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MoEConfig)})
    if unknown:
        raise UserError(f"moe_config_from_megatron: unknown MoEConfig fields {unknown}")
    values.update(overrides)
    return MoEConfig(**values)


def check_megatron_config(transformer_config: Any, config: MoEConfig) -> None:
    """Raise ``UserError`` listing every way ``transformer_config`` and ``config`` disagree on what
    the router needs, and every Megatron option the router cannot honour."""
    tc = transformer_config
    problems = []
    for ours, theirs in (("num_experts", "num_moe_experts"), ("hidden_size", "hidden_size")):
        if getattr(tc, theirs) != getattr(config, ours):
            problems.append(f"TransformerConfig.{theirs}={getattr(tc, theirs)!r} but MoEConfig.{ours}={getattr(config, ours)!r}")
    if tc.moe_router_score_function != config.score_function:
        problems.append(f"TransformerConfig.moe_router_score_function={tc.moe_router_score_function!r} but "
                        f"MoEConfig.score_function={config.score_function!r}")
    aux_coeff, aux_problems = _megatron_aux_loss(tc)
    ours_aux = config.aux_loss_coeff if config.balance == "aux_loss" else 0.0
    if aux_coeff != ours_aux:  # the router computes the losses from MoEConfig: they must agree
        problems.append(f"Megatron's aux-loss coefficient is {aux_coeff} but MoEConfig gives {ours_aux} "
                        f"(balance={config.balance!r}, aux_loss_coeff={config.aux_loss_coeff})")
    if float(tc.moe_z_loss_coeff or 0.0) != config.z_loss_coeff:
        problems.append(f"TransformerConfig.moe_z_loss_coeff={tc.moe_z_loss_coeff!r} but "
                        f"MoEConfig.z_loss_coeff={config.z_loss_coeff}")
    problems += aux_problems + _unsupported_options(tc)
    if problems:
        raise UserError("SMoEDropoutRouter: the Megatron config does not fit the router: " + "; ".join(problems))


def _megatron_aux_loss(tc: Any) -> tuple[float, list[str]]:
    """The "aux_loss" coefficient of ``tc`` (0 when off) and the balancing types it enables that
    have no counterpart here (sinkhorn, seq_aux_loss, global_aux_loss)."""
    types = tc.moe_router_load_balancing_type
    coeffs = tc.moe_aux_loss_coeff
    if isinstance(types, str):
        types, coeffs = [types], [coeffs if types != "sinkhorn" else 1.0]
    coeff, problems = 0.0, []
    for kind, value in zip(types, coeffs):
        if kind == "aux_loss":
            coeff = float(value)
        elif kind != "none" and value:
            problems.append(f"moe_router_load_balancing_type={kind!r} (supported: 'none', 'aux_loss'; "
                            "for auxiliary-loss-free balancing use MoEConfig balance='bias')")
    return coeff, problems


def _unsupported_options(tc: Any) -> list[str]:
    # every option is off when None, False or 0
    return [f"{name}={getattr(tc, name)!r} ({why})" for name, _, why in _UNSUPPORTED
            if getattr(tc, name, None) not in (None, False, 0)]


def _activation_name(tc: Any) -> Optional[str]:
    for name, (gated, function) in _ACTIVATIONS.items():
        if bool(tc.gated_linear_unit) == gated and tc.activation_func is function:
            return name
    return None


# --------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------


class SMoEDropoutRouter(TopKRouter):
    """``moe.TopKRouter`` behind Megatron-core's router interface (see the module docstring).

    ``forward(hidden_states [S, B, d] or [T, d], padding_mask=None) -> (probs [T, E], routing_map
    [T, E] bool)``: ``routing_map`` marks the chosen (and, with a capacity, kept) experts, ``probs``
    holds their gate weights (0 elsewhere), fp32 (or the input's dtype when the Megatron config
    leaves ``moe_router_dtype`` unset, as Megatron's router does). ``padding_mask`` (True where a
    token is padding, as inside Megatron's router) only keeps padding out of the balancing counts.
    After each forward ``last_routing`` holds our :class:`moe.Routing` of the call (detached).
    """

    def __init__(self, config: MoEConfig, transformer_config: Any = None, pg_collection: Any = None,
                 layer_number: int = 1):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"SMoEDropoutRouter: expected a MoEConfig, got {type(config).__name__}")
        _check_layer_number(layer_number)
        super().__init__(config, layer_idx=layer_number - 1)
        if transformer_config is not None:
            check_megatron_config(transformer_config, config)
        self.transformer_config = transformer_config  # pg_collection: no collective in the router
        self.layer_number = layer_number
        self.active_experts = k_at_step(config, 0)
        self._built_topk = getattr(transformer_config, "moe_router_topk", self.active_experts)
        self.last_routing = None
        if self.is_learned and transformer_config is not None:
            # Megatron all-reduces the grads of sequence-parallel parameters over tensor parallel ranks.
            setattr(self.weight, "sequence_parallel", bool(transformer_config.sequence_parallel))

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def layer_idx(self) -> int:
        return self.layer_number - 1

    def set_layer_number(self, layer_number: int) -> None:
        """Called by Megatron's transformer layer with its global 1-based number: the fixed random
        gate becomes layer ``layer_number - 1``'s gate (as ``moe.TopKRouter`` draws it)."""
        _check_layer_number(layer_number)
        self.layer_number = layer_number
        if not self.is_learned:
            gate = TopKRouter(self.config, layer_idx=layer_number - 1).weight
            with torch.no_grad():
                self.weight.copy_(gate.to(device=self.weight.device, dtype=self.weight.dtype))

    def set_active_experts(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise UserError(f"active experts k={k!r} is invalid for the router of Megatron layer {self.layer_number}: "
                            f"expected an integer in 1..{self.num_experts}")
        self.active_experts = k

    def _check_run_time_k(self, k: int) -> None:
        tc = self.transformer_config
        if tc is None:
            return
        problems = []
        if k != self._built_topk and tc.moe_token_dispatcher_type == "flex":
            problems.append(f"the 'flex' dispatcher was built for k={self._built_topk}")
        if k != tc.moe_router_topk and tc.moe_permute_fusion:
            problems.append(f"moe_permute_fusion sizes its buffers for config.moe_router_topk={tc.moe_router_topk} "
                            "(set every layer's k together with parallel.megatron.set_active_experts(model, k), "
                            "or turn the fusion off)")
        if k != 1 and tc.moe_apply_probs_on_input:
            problems.append("moe_apply_probs_on_input needs k=1")
        if problems:
            raise UserError(f"SMoEDropoutRouter (layer {self.layer_number}): run-time k={k} cannot be used: "
                            + "; ".join(problems))

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        k = self.active_experts
        self._check_run_time_k(k)
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, d]
        routing = super().forward(tokens, k)
        if padding_mask is not None and self.expert_bias is not None and self.training and torch.is_grad_enabled():
            # padding was counted by the base class: take it back out of the balancing counts
            padded = padding_mask.reshape(-1).to(torch.bool)  # [T], True = padding
            padded_ids = routing.indices[padded].flatten()
            self.pending_tokens -= expert_counts(padded_ids, self.num_experts)

        num_tokens = tokens.shape[0]
        chosen = torch.ones_like(routing.indices, dtype=torch.bool) if routing.kept is None else routing.kept
        routing_map = torch.zeros(num_tokens, self.num_experts, dtype=torch.bool, device=tokens.device)
        routing_map.scatter_(1, routing.indices, chosen)  # [T, E]
        probs = torch.zeros(num_tokens, self.num_experts, dtype=routing.weights.dtype, device=tokens.device)
        probs = probs.scatter(1, routing.indices, routing.weights)  # [T, E], differentiable in the weights
        if self.transformer_config is not None and self.transformer_config.moe_router_dtype is None:
            probs = probs.to(hidden_states.dtype)
        probs = self._attach_losses(probs, routing, num_tokens)
        self.last_routing = routing.detached()
        return probs, routing_map

    def _attach_losses(self, probs: torch.Tensor, routing, num_tokens: int) -> torch.Tensor:
        terms = (routing.aux_loss, routing.z_loss, getattr(routing, "mi_loss", None))
        losses = [loss for loss in terms if loss is not None]
        if not losses:
            return probs
        loss = sum(losses)
        if self.transformer_config is not None and self.transformer_config.calculate_per_token_loss:
            loss = loss * num_tokens  # Megatron divides every gradient by the token count later
        # The loss's gradient enters in backward, scaled like Megatron's own router losses.
        return _megatron()["MoEAuxLossAutoScaler"].apply(probs, loss)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer_number={self.layer_number}, E={c.num_experts}, k={self.active_experts}, router={c.router}, "
                f"score={c.score_function}, balance={c.balance}")


def _check_layer_number(layer_number: Any) -> None:
    if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 1:
        raise UserError(f"layer_number={layer_number!r}: expected Megatron's 1-based layer number (an integer >= 1)")


@dataclasses.dataclass(frozen=True)
class RandomRouterBuilder:
    """What goes into ``MoESubmodules.router``: Megatron's ``MoELayer`` calls
    ``builder(config=transformer_config, pg_collection=...)`` and gets a :class:`SMoEDropoutRouter`."""

    moe_config: MoEConfig

    def __call__(self, *, config: Any, pg_collection: Any = None) -> SMoEDropoutRouter:
        return SMoEDropoutRouter(self.moe_config, transformer_config=config, pg_collection=pg_collection)


def with_random_router(spec: Any, config: MoEConfig) -> Any:
    """A copy of a Megatron spec (a layer spec from ``get_gpt_layer_local_spec``/``..._with_transformer_engine_spec``,
    a block spec, or the MoE spec from ``get_moe_module_spec``) whose every MoE layer is built with
    :class:`SMoEDropoutRouter` for ``config``. Raises ``UserError`` if the spec has no MoE layer."""
    moe_submodules = _megatron()["MoESubmodules"]
    spec = copy.deepcopy(spec)
    found = []

    def visit(node: Any) -> None:
        if isinstance(node, moe_submodules):
            node.router = RandomRouterBuilder(config)
            found.append(node)
        if isinstance(node, (list, tuple)):
            for item in node:
                visit(item)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                visit(getattr(node, field.name))

    visit(spec)
    if not found:
        raise UserError("with_random_router: the spec contains no MoE layer (MoESubmodules); "
                        "build it with num_experts set")
    return spec


def install_random_router(model: Union[nn.Module, Sequence[nn.Module]], config: MoEConfig) -> int:
    """Replace the router of every Megatron-core ``MoELayer`` in ``model`` (a module or a list of
    model chunks) with a :class:`SMoEDropoutRouter` on the old router's device; returns how many.
    Call it right after building the model, before DDP wrapping and the optimizer (the old
    router's gate Parameter disappears)."""
    moe_layer_type = _megatron()["MoELayer"]
    replaced = 0
    for module in _modules(model):
        if not isinstance(module, moe_layer_type):
            continue
        old = module.router
        device = next((t.device for t in old.parameters()), None) or next((t.device for t in old.buffers()), None)
        router = SMoEDropoutRouter(config, transformer_config=module.config, layer_number=module.layer_number or 1)
        module.router = router.to(device) if device is not None else router
        replaced += 1
    if not replaced:
        raise UserError("install_random_router: the model contains no Megatron-core MoELayer")
    return replaced


# --------------------------------------------------------------------------------------------
# Run-time operations (the counterparts of moe.set_active_experts / advance_k_schedule /
# update_expert_biases for a Megatron model)
# --------------------------------------------------------------------------------------------


def _modules(model: Union[nn.Module, Iterable[nn.Module]]):
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    for chunk in chunks:
        yield from chunk.modules()


def megatron_routers(model: Union[nn.Module, Iterable[nn.Module]]) -> list[SMoEDropoutRouter]:
    """Every :class:`SMoEDropoutRouter` in ``model`` (a module or a list of model chunks), in order."""
    return [m for m in _modules(model) if isinstance(m, SMoEDropoutRouter)]


def _routers_or_fail(model, what: str) -> list[SMoEDropoutRouter]:
    routers = megatron_routers(model)
    if not routers:
        raise UserError(f"{what}: the model contains no SMoEDropoutRouter")
    return routers


def set_active_experts(model, k: Union[int, Sequence[int]]) -> None:
    """Set the run-time k of every router (one int, or one k per router in model order). With one
    k for all, ``moe_router_topk`` of their Megatron configs follows, so Megatron's dispatcher and
    capacity helpers size for the same k."""
    routers = _routers_or_fail(model, "set_active_experts")
    ks = list(k) if isinstance(k, (list, tuple)) else [k] * len(routers)
    if len(ks) != len(routers):
        raise UserError(f"set_active_experts: got {len(ks)} values of k for {len(routers)} routers")
    for router, router_k in zip(routers, ks):  # validate everything before changing anything
        if isinstance(router_k, bool) or not isinstance(router_k, int) or not 1 <= router_k <= router.num_experts:
            raise UserError(f"set_active_experts: k={router_k!r} is invalid for the router of Megatron layer "
                            f"{router.layer_number}: expected an integer in 1..{router.num_experts}")
    for router, router_k in zip(routers, ks):
        router.set_active_experts(router_k)
    if len(set(ks)) == 1:
        for router in routers:
            if router.transformer_config is not None:
                router.transformer_config.moe_router_topk = ks[0]


def advance_k_schedule(model, step: int) -> list[int]:
    """Set each router's k to its schedule's value at optimizer step ``step`` (``moe.k_at_step``);
    returns the ks. Call it at the start of every training iteration."""
    routers = _routers_or_fail(model, "advance_k_schedule")
    ks = [k_at_step(router.config, step) for router in routers]
    set_active_experts(model, ks if len(set(ks)) > 1 else ks[0])
    return ks


_MEGATRON_GROUP = object()


def _default_group():
    if not dist.is_available() or not dist.is_initialized():
        return None
    parallel_state = _megatron()["parallel_state"]
    if not parallel_state.model_parallel_is_initialized():
        return None
    # The group Megatron sums its own expert-bias counts over: tensor x data x context parallel.
    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


@torch.no_grad()
def update_expert_biases(model, group: Any = _MEGATRON_GROUP) -> Optional[torch.Tensor]:
    """One auxiliary-loss-free bias update of every bias-balanced router, exactly as
    ``moe.update_expert_biases`` does for our model: the counts accumulated since the last call
    (training-mode forwards, padding excluded) are summed over ``group`` with one all-reduce
    (default: Megatron's tensor x data x context parallel group when ``parallel_state`` is
    initialized; ``None``: no reduction), the bias moves by ``moe.balance.updated_expert_bias`` at
    the layer's rate schedule, and the counts reset. Call once per optimizer step.

    Returns the ``[L, E]`` summed counts, or None if no router balances by bias."""
    routers = [r for r in megatron_routers(model) if r.expert_bias is not None]
    if not routers:
        return None
    if group is _MEGATRON_GROUP:
        group = _default_group()
    counts = torch.stack([router.pending_tokens for router in routers])  # [L, E]
    if group is not None:
        counts = on_collective_device(counts, group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        counts = counts.to(routers[0].pending_tokens.device)
    for router, layer_counts in zip(routers, counts):
        cfg = router.config
        routed = layer_counts.sum() > 0  # a layer that routed nothing keeps its bias
        updated = updated_expert_bias(router.expert_bias, layer_counts, _bias_rate(cfg, router.bias_updates),
                                      cfg.bias_update_mode)
        router.expert_bias.copy_(torch.where(routed, updated, router.expert_bias))
        router.bias_updates += routed
        router.pending_tokens.zero_()
    return counts


def _bias_rate(config: MoEConfig, updates: torch.Tensor):
    """The rate of ``moe.schedules.bias_rate_at_update`` at the device count ``updates``, computed
    as ``moe.update_expert_biases`` computes it (no host sync)."""
    if config.bias_update_schedule == "constant":
        return config.bias_update_rate
    return (config.bias_update_rate / (1.0 + updates.double() / config.bias_update_t0)).float()


def finalize_model_grads_with_bias_update(finalize_model_grads, group: Any = _MEGATRON_GROUP):
    """Wrap Megatron's ``finalize_model_grads_func`` (run once per global batch, where Megatron
    moves its own expert bias) so that it also runs :func:`update_expert_biases` on the model."""

    def finalize(model, *args, **kwargs):
        result = finalize_model_grads(model, *args, **kwargs)
        update_expert_biases(model, group)
        return result

    return finalize
