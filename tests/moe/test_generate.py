"""Inference: generation with a KV cache equals generation without one, at any k; k = E is the
full dense mixture of experts; per-layer k lists reach their layers; bad requests are errors."""

from __future__ import annotations

import pytest
import torch

import moe
from moe import ModelConfig, MoEConfig, MoETransformer
from moe.model import KVCache


def _model(**moe_options) -> MoETransformer:
    options = dict(hidden_size=16, ffn_hidden_size=12, num_experts=4, top_k=2, router="random", balance="bias")
    options.update(moe_options)
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(num_layers=3, num_heads=2, max_seq_len=48, moe=MoEConfig(**options))).eval()


@pytest.mark.parametrize("active_experts", [None, 1, 4, [1, 3, 2]])
def test_cached_generation_equals_recomputing_everything(active_experts):
    model = _model()
    prompt = torch.randint(0, 256, (3, 7))
    cached = model.generate(prompt, 16, active_experts=active_experts, temperature=0)
    uncached = model.generate(prompt, 16, active_experts=active_experts, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (3, 23)
    assert torch.equal(cached[:, :7], prompt)


def test_incremental_logits_equal_the_full_forward():
    model = _model()
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(len(model.blocks))
        pieces = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 12)]
        pieces.append(model(tokens[:, 12:], cache=cache))  # a chunk after single steps
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = _model()
    prompt = torch.randint(0, 256, (2, 4))
    first = model.generate(prompt, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    again = model.generate(prompt, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1), model.generate(prompt, 10, temperature=0))


def test_generate_restores_the_models_k_and_mode():
    model = _model()
    moe.set_active_experts(model, 3)
    model.train()
    model.generate(torch.randint(0, 256, (1, 3)), 2, active_experts=1)
    assert [b.ffn.active_experts for b in model.blocks] == [3, 3, 3] and model.training


def test_per_layer_k_reaches_each_layer():
    model = _model()
    moe.set_active_experts(model, [1, 4, 2])
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 6)))
    assert [b.ffn.last_routing.indices.shape[1] for b in model.blocks] == [1, 4, 2]


def test_k_equal_to_e_is_the_full_softmax_mixture_of_all_experts():
    """At k = E every token uses every expert, weighted by the softmax over all E logits:
    y = sum_e softmax(x W^T)_e * expert_e(x), computed here expert by expert."""
    model = _model(router="learned", balance="none", num_experts=4)
    layer = model.blocks[0].ffn
    moe.set_active_experts(model, 4)
    x = torch.randn(9, 16)
    with torch.no_grad():
        y = layer(x)
        gates = torch.softmax(x @ layer.router.weight.t(), dim=-1)  # [T, E]
        experts = layer.experts
        expected = sum(
            gates[:, e : e + 1]
            * ((torch.nn.functional.silu(x @ experts.w1[e]) * (x @ experts.w3[e])) @ experts.w2[e])
            for e in range(4)
        )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 3), "input_ids must be"),
        (lambda m: m.generate(torch.zeros(1, 40, dtype=torch.long), 9), "must fit in max_seq_len"),
        (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 3, active_experts=5), "expected an integer in 1..4"),
        (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 3, active_experts=0), "expected an integer in 1..4"),
        (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), 3, temperature=-1), "temperature=-1"),
    ],
)
def test_bad_requests_are_errors(call, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        call(model)
    assert [b.ffn.active_experts for b in model.blocks] == [2, 2, 2]  # nothing changed


@pytest.mark.parametrize("k", [1, 3, 4])
def test_flops_per_token_matches_torchs_flop_counter(k):
    """The analytic count against torch.utils.flop_counter's count of the matmuls of a forward
    (it does not count CPU attention, so compare at context 0: attention adds 4 d context per layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(router="learned", balance="none")
    moe.set_active_experts(model, k)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, 5)))
    assert 5 * model.flops_per_token(context=0) == counter.get_total_flops()
    assert model.flops_per_token(context=10) - model.flops_per_token(context=0) == 3 * 4 * 16 * 10
