"""Sparse upcycling: a trained dense model becomes an MoE whose experts start from its FFNs.

The dense source is a :class:`~moe.model.MoETransformer` of this framework whose every FFN is dense:
blocks with a :class:`~moe.experts.DenseFFN`, and MoE blocks of one expert (``num_experts: 1``,
``top_k: 1``, as ``configs/tiny_dense.yaml``: with one expert the normalised gate weight is 1, so
such a block is a dense SwiGLU plus a d-FLOP router nobody reads). Every FFN must be SwiGLU with one
width ``F``.

Each FFN becomes an MoE layer of E experts of width ``F / granularity``:

- ``granularity`` 1 (sparse upcycling, Komatsuzaki et al. 2023; MoE-LLaVA's MoE-tuning): every
  expert is a copy of the FFN. Whatever the router and k, normalised gate weights sum to 1 over the
  k chosen copies, so at init the layer computes the FFN exactly.
- ``granularity`` G > 1 (fine-grained experts): the FFN's hidden units are cut into G slices, and
  expert e is slice ``e mod G`` (E a multiple of G), its ``w2`` times G. When a token's k = G
  chosen experts are one of each slice with equal gate weights 1/G (a learned router initialised
  to zero: every score ties and top-k takes experts 0..G-1), the layer computes the FFN exactly;
  otherwise it starts as an approximation of it.

``noise`` S > 0 adds independent Gaussian noise of S times each weight's standard deviation to
every expert, so copies differ from the first step (noise 0 keeps the function exact).
Attention, norms, embeddings and the LM head are copied unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moe.errors import UserError
from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.model import ModelConfig, MoETransformer


def dense_ffn_weights(block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w1 [d, F], w3 [d, F], w2 [F, d])`` of a block's dense FFN (a DenseFFN, or a one-expert MoE
    layer), in the experts' ``x @ w`` layout."""
    ffn = block.ffn
    if isinstance(ffn, DenseFFN):
        return ffn.w1.weight.t(), ffn.w3.weight.t(), ffn.w2.weight.t()
    if isinstance(ffn, MoELayer) and ffn.num_experts == 1 and ffn.experts.w3 is not None:
        if ffn.shared_mlp is not None:
            raise UserError("upcycle: the dense model's MoE blocks have shared experts; expected plain FFNs")
        return ffn.experts.w1[0], ffn.experts.w3[0], ffn.experts.w2[0]
    raise UserError(
        f"upcycle: block {ffn.layer_idx if isinstance(ffn, MoELayer) else '?'} is not a dense SwiGLU FFN "
        f"({type(ffn).__name__}{f' with {ffn.num_experts} experts' if isinstance(ffn, MoELayer) else ''}); "
        "the source must be a dense model (DenseFFN blocks, or MoE blocks with num_experts: 1 and swiglu)"
    )


def upcycled_config(dense: ModelConfig, ffn_width: int, num_experts: int, granularity: int = 1,
                    router: str = "random", top_k: Optional[int] = None, **moe_changes) -> ModelConfig:
    """The MoE model's config: the dense one with every block an MoE of ``num_experts`` experts of
    width ``ffn_width / granularity`` (k = ``top_k``, default ``granularity``)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise UserError(f"upcycle: --experts {num_experts!r} is invalid: expected an integer >= 2")
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise UserError(f"upcycle: --granularity {granularity!r} is invalid: expected an integer >= 1")
    if ffn_width % granularity or num_experts % granularity:
        raise UserError(f"upcycle: --granularity {granularity} must divide the FFN width ({ffn_width}) and "
                        f"--experts ({num_experts})")
    k = top_k if top_k is not None else granularity
    moe_changes.setdefault("normalize_topk", True)  # the gates of the k chosen experts sum to 1
    try:
        moe = dataclasses.replace(
            dense.moe, num_experts=num_experts, ffn_hidden_size=ffn_width // granularity, top_k=k, router=router,
            k_schedule="constant", k_min=None, k_max=None, num_shared_experts=0, shared_ffn_hidden_size=None,
            activation="swiglu", **moe_changes,
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"upcycle: {err}") from None
    return dataclasses.replace(dense, moe_every=1, dense_ffn_hidden_size=None, moe=moe)


@torch.no_grad()
def upcycle(dense: MoETransformer, num_experts: int, granularity: int = 1, router: str = "random",
            top_k: Optional[int] = None, noise: float = 0.0, seed: int = 0, **moe_changes) -> MoETransformer:
    """An MoE :class:`~moe.model.MoETransformer` whose experts start from ``dense``'s FFNs (see the
    module docstring); on the CPU in fp32, in eval mode. ``moe_changes``: other MoEConfig fields
    of the result (balance, score_function, ...)."""
    if noise < 0:
        raise UserError(f"upcycle: --noise {noise} is invalid: expected a number >= 0")
    ffns = [dense_ffn_weights(block) for block in dense.blocks]
    widths = {w1.shape[1] for w1, _, _ in ffns}
    if len(widths) != 1:
        raise UserError(f"upcycle: the dense model's FFNs have different widths {sorted(widths)}; expected one")
    config = upcycled_config(dense.config, widths.pop(), num_experts, granularity, router, top_k, **moe_changes)
    model = MoETransformer(config).eval()  # routers drawn as for any new model of this config
    source = {name: t for name, t in dense.state_dict().items() if ".ffn." not in name}
    missing = [name for name in source if name not in model.state_dict()]
    if missing:
        raise UserError(f"upcycle: the dense model has tensors the MoE model lacks: {missing[:3]}")
    model.load_state_dict(source, strict=False)
    generator = torch.Generator().manual_seed(seed)
    width = config.moe.ffn_hidden_size
    for block, (w1, w3, w2) in zip(model.blocks, ffns):
        experts = block.ffn.experts
        for e in range(num_experts):
            part = slice((e % granularity) * width, (e % granularity + 1) * width)
            for target, value in ((experts.w1, w1[:, part]), (experts.w3, w3[:, part]),
                                  (experts.w2, w2[part] * granularity)):
                value = value.float()
                if noise > 0:
                    value = value + noise * value.std() * torch.randn(value.shape, generator=generator)
                target[e].copy_(value)
    return model
