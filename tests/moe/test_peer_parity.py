"""Parity of the MoE layer with two peer implementations: DeepSpeed's ``deepspeed.moe.layer.MoE``
(top-2 softmax gate, dropless, GELU experts) and Megatron-core's router helpers
(``topk_routing_with_score_function`` and ``get_updated_expert_bias``).

The same weights go into both sides; outputs, routing decisions, gate weights, expert counts,
gradients and bias updates must agree (fp32 tolerance, or bit-equal for the bias update).
"""

from __future__ import annotations

import os

# DeepSpeed picks its accelerator when first imported; these tests run on CPU tensors.
os.environ["DS_ACCELERATOR"] = "cpu"

import pytest
import torch
import torch.distributed as dist
from torch import nn

from deepspeed.moe.layer import MoE as DeepSpeedMoE
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils

from moe import GroupedRows, MoEConfig, MoELayer
from moe.balance import updated_expert_bias
from parallel.engine import skip_shm_allreduce
from tests.runs import free_port


# --------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process_group():
    """DeepSpeed's MoE expects torch.distributed to be up: a one-rank gloo group if none is."""
    created = False
    skip_shm_allreduce()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        created = True
    yield
    if created and dist.is_initialized():
        dist.destroy_process_group()


def _paired_layers(d: int, f: int, num_experts: int, seed: int):
    """Our top-2 softmax GELU layer and a DeepSpeed MoE holding the same weights."""
    torch.manual_seed(seed)
    cfg = MoEConfig(
        hidden_size=d,
        ffn_hidden_size=f,
        num_experts=num_experts,
        top_k=2,
        router="learned",
        score_function="softmax",
        normalize_topk=True,
        activation="gelu",
        balance="none",
    )
    ours = MoELayer(cfg)
    with torch.no_grad():
        # Logits of order 1 (the default std 0.02 makes near-uniform, near-tied scores).
        ours.router.weight.normal_(0.0, 1.0 / d**0.5)

    expert = nn.Sequential(nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False))
    peer = DeepSpeedMoE(
        hidden_size=d,
        expert=expert,
        num_experts=num_experts,
        ep_size=1,
        k=2,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
        noisy_gate_policy=None,
    )
    ds_experts = peer.deepspeed_moe.experts.deepspeed_experts
    assert len(ds_experts) == num_experts
    with torch.no_grad():
        peer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e in range(num_experts):
            ds_experts[e][0].weight.copy_(ours.experts.w1[e].T)
            ds_experts[e][2].weight.copy_(ours.experts.w2[e].T)
    return ours, peer


SHAPES = [
    # (d, f, E, T)
    (24, 40, 4, 37),
    (64, 96, 8, 128),
    (23, 37, 5, 19),  # odd widths: the grouped GEMM takes its loop fallback on CPU
]


@pytest.mark.parametrize("d,f,num_experts,num_tokens", SHAPES)
def test_matches_deepspeed_moe_eval(single_process_group, d, f, num_experts, num_tokens):
    ours, peer = _paired_layers(d, f, num_experts, seed=1000 + d)
    ours.eval()
    peer.eval()

    # Both sides use the exact (erf) GELU: nn.GELU() default and F.gelu default.
    ds_gelu = peer.deepspeed_moe.experts.deepspeed_experts[0][1]
    assert isinstance(ds_gelu, nn.GELU) and ds_gelu.approximate == "none"
    probe = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(ds_gelu(probe), 0.5 * probe * (1 + torch.erf(probe / 2**0.5)))
    assert ours.experts.activation == "gelu"
    rows = torch.randn(6, d)
    on_expert_0 = GroupedRows(
        source=rows,
        row_index=torch.arange(6),
        row_weight=torch.ones(6),
        tokens_per_expert=torch.tensor([6] + [0] * (num_experts - 1)),
    )
    torch.testing.assert_close(ours.experts(on_expert_0), ds_gelu(rows @ ours.experts.w1[0]) @ ours.experts.w2[0])

    torch.manual_seed(7 + num_tokens)
    x = torch.randn(num_tokens, d)
    with torch.no_grad():
        expected, _, exp_counts = peer(x)
        actual = ours(x)
        # The gate alone: (l_aux, capacity, E, indices [2, T], locations, gates [2, T], counts).
        _, capacity, _, ds_indices, _, ds_gates, _ = peer.deepspeed_moe.gate(x, None, True)

    routing = ours.last_routing
    assert actual.shape == expected.shape == (num_tokens, d)
    # Same experts, in the same order (first choice = argmax), and the same renormalised weights.
    torch.testing.assert_close(routing.indices, ds_indices.T.to(torch.int64), rtol=0, atol=0)
    torch.testing.assert_close(routing.weights, ds_gates.T.float())
    torch.testing.assert_close(routing.tokens_per_expert, exp_counts.to(torch.int64), rtol=0, atol=0)
    # Dropless on both sides: DeepSpeed's capacity is the largest expert load.
    assert int(capacity) == int(exp_counts.max())
    assert routing.kept is None and routing.num_dropped == 0
    torch.testing.assert_close(actual, expected)

    # [batch, seq, d] input goes through both the same way.
    x3 = x.reshape(1, num_tokens, d)
    with torch.no_grad():
        torch.testing.assert_close(ours(x3), peer(x3)[0])


@pytest.mark.parametrize("d,f,num_experts,num_tokens", SHAPES[:2])
def test_matches_deepspeed_moe_gradients(single_process_group, d, f, num_experts, num_tokens):
    """Training mode: with drop_tokens=False, no 2nd-expert sampling and no noisy gate, DeepSpeed's
    top-2 gate is deterministic and dropless (capacity = max load, capacity_factor unused), and its
    combine weights are the softmax renormalised over the two chosen experts, as ours. The aux loss
    l_aux is left out of the loss (ours has balance="none", so no aux loss at all)."""
    ours, peer = _paired_layers(d, f, num_experts, seed=2000 + d)
    ours.train()
    peer.train()

    torch.manual_seed(11 + num_tokens)
    x = torch.randn(num_tokens, d)
    grad_out = torch.randn(num_tokens, d)
    x_ours = x.clone().requires_grad_(True)
    x_peer = x.clone().requires_grad_(True)

    out_ours = ours(x_ours)
    out_peer, _, exp_counts = peer(x_peer)
    assert ours.aux_loss() is None
    torch.testing.assert_close(ours.last_routing.tokens_per_expert, exp_counts.to(torch.int64), rtol=0, atol=0)
    torch.testing.assert_close(out_ours, out_peer)

    (out_ours * grad_out).sum().backward()
    (out_peer * grad_out).sum().backward()

    ds_experts = peer.deepspeed_moe.experts.deepspeed_experts
    router_grad = peer.deepspeed_moe.gate.wg.weight.grad
    # The router gradient comes only through the gate weights: it must be there and non-zero.
    assert ours.router.weight.grad is not None and ours.router.weight.grad.abs().sum() > 0
    # fp32 sums over tokens in a different order: DeepSpeed's own MoE tests use rtol=1e-4.
    torch.testing.assert_close(ours.router.weight.grad, router_grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_peer.grad, rtol=1e-5, atol=1e-6)
    for e in range(num_experts):
        torch.testing.assert_close(ours.experts.w1.grad[e], ds_experts[e][0].weight.grad.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.experts.w2.grad[e], ds_experts[e][2].weight.grad.T, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Megatron-core routing
# --------------------------------------------------------------------------------------------


def _router_layer(d: int, num_experts: int, k: int, score_function: str, normalize: bool, balance: str):
    cfg = MoEConfig(
        hidden_size=d,
        ffn_hidden_size=16,
        num_experts=num_experts,
        top_k=k,
        router="learned",
        score_function=score_function,
        normalize_topk=normalize,
        activation="gelu",
        balance=balance,
    )
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0 / d**0.5)
    return layer


def _dense(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """[T, k] choices -> ([T, E] bool map, [T, E] weights)."""
    num_tokens = indices.shape[0]
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, indices, True)
    probs = torch.zeros(num_tokens, num_experts, dtype=weights.dtype).scatter(1, indices, weights)
    return routing_map, probs


def _route_both(layer: MoELayer, x: torch.Tensor, **megatron_kwargs):
    with torch.no_grad():
        layer(x)
        weight = layer.router.weight.detach().float()
        logits = x.float() @ weight.T  # [T, E] fp32
        probs, routing_map = moe_utils.topk_routing_with_score_function(logits, layer.active_experts, **megatron_kwargs)
    routing = layer.last_routing
    our_map, our_probs = _dense(routing.indices, routing.weights, layer.num_experts)
    return (our_map, our_probs), (routing_map, probs)


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("num_experts", [8, 16])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sigmoid_routing_matches_megatron(num_experts, k, with_bias):
    d, num_tokens = 32, 96
    # Megatron normalises sigmoid scores over the k only when topk > 1 (moe_utils:
    # ``probs = scores / (scores.sum(-1) + 1e-20) if topk > 1 else scores``): for k=1 it keeps the
    # raw sigmoid, which is our normalize_topk=False (ours with True would give weight 1.0).
    normalize = k > 1
    for seed in SEEDS:
        torch.manual_seed(100 * seed + 10 * k + num_experts)
        layer = _router_layer(d, num_experts, k, "sigmoid", normalize, "bias" if with_bias else "none")
        x = torch.randn(num_tokens, d)
        bias = None
        if with_bias:
            bias = torch.randn(num_experts) * 0.2
            with torch.no_grad():
                layer.router.expert_bias.copy_(bias)
        (our_map, our_probs), (mg_map, mg_probs) = _route_both(
            layer, x, score_function="sigmoid", expert_bias=bias
        )
        assert mg_map.shape == (num_tokens, num_experts)
        assert torch.equal(our_map, mg_map), f"seed={seed}: selected expert sets differ"
        torch.testing.assert_close(our_probs, mg_probs.float())

        if with_bias:
            # The bias must actually have steered some choices, or this compared nothing new.
            unbiased_topk = torch.topk(torch.sigmoid(x @ layer.router.weight.detach().T), k, dim=-1).indices
            unbiased_map, _ = _dense(unbiased_topk, torch.ones(num_tokens, k), num_experts)
            assert not torch.equal(unbiased_map, mg_map), f"seed={seed}: the bias changed no selection"
        if k == 1:
            # Raw sigmoid scores, not 1.0: the reason normalize_topk=False above.
            assert (mg_probs.sum(-1) < 1).all()


@pytest.mark.parametrize("num_experts", [8, 16])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("use_pre_softmax", [True, False], ids=["pre_softmax", "post_softmax"])
def test_softmax_routing_matches_megatron(num_experts, k, use_pre_softmax):
    """use_pre_softmax=True: softmax over all E, then top-k, no renormalisation -> ours with
    normalize_topk=False. use_pre_softmax=False: top-k of the logits, then softmax over those k ->
    ours with normalize_topk=True (softmax over E renormalised over the k is the same thing)."""
    d, num_tokens = 32, 96
    for seed in SEEDS:
        torch.manual_seed(100 * seed + 10 * k + num_experts + 7)
        layer = _router_layer(d, num_experts, k, "softmax", not use_pre_softmax, "none")
        x = torch.randn(num_tokens, d)
        (our_map, our_probs), (mg_map, mg_probs) = _route_both(
            layer, x, score_function="softmax", use_pre_softmax=use_pre_softmax
        )
        assert torch.equal(our_map, mg_map), f"seed={seed}: selected expert sets differ"
        torch.testing.assert_close(our_probs, mg_probs.float())
        row_sums = mg_probs.sum(-1)
        if use_pre_softmax:
            assert (row_sums < 1).all()  # k < E: the kept softmax mass is not renormalised
        else:
            torch.testing.assert_close(row_sums, torch.ones(num_tokens))


# --------------------------------------------------------------------------------------------
# Megatron-core bias update
# --------------------------------------------------------------------------------------------


@pytest.fixture
def megatron_without_collectives(monkeypatch):
    """``get_updated_expert_bias`` all-reduces the counts over the TPxCPxDP group; on one process
    that is the identity. It calls ``torch.distributed.all_reduce`` and
    ``parallel_state.get_tensor_and_data_parallel_group`` through the module attributes."""
    assert moe_utils.torch.distributed is dist and moe_utils.parallel_state is parallel_state
    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):
        calls.append(kwargs.get("group", args[1] if len(args) > 1 else None))

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(parallel_state, "get_tensor_and_data_parallel_group", lambda *a, **kw: None)
    return calls


@pytest.mark.parametrize("count_dtype", [torch.int64, torch.float32])
def test_bias_update_matches_megatron(megatron_without_collectives, count_dtype):
    counts = torch.tensor(
        [
            [2, 4, 6, 4, 4, 8, 0, 4],  # mean 4: four experts exactly at the mean (sign 0)
            [5, 5, 5, 5, 5, 5, 5, 5],  # all equal: no change at all
            [0, 0, 0, 0, 0, 0, 0, 0],  # nothing routed: no change
            [31, 0, 7, 12, 3, 19, 1, 8],  # mean 10.125
            [1, 2, 3, 4, 5, 6, 7, 100],  # one hot expert
        ],
        dtype=count_dtype,
    )
    torch.manual_seed(3)
    bias = torch.randn(counts.shape) * 1e-2
    for rate in (1e-3, 0.37):
        expected = moe_utils.get_updated_expert_bias(counts.clone(), bias.clone(), rate)
        actual = updated_expert_bias(bias.clone(), counts.clone(), rate)
        assert actual.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        # The ties really are ties: unchanged where the count equals the row mean.
        at_mean = counts.float() == counts.float().mean(-1, keepdim=True)
        assert at_mean[0].sum() == 4 and at_mean[1].all() and at_mean[2].all()
        torch.testing.assert_close(actual[at_mean], bias[at_mean], rtol=0, atol=0)
        assert (actual[~at_mean] != bias[~at_mean]).all()
        # Per row ([E] input) gives the same as the [L, E] batch.
        for row in range(counts.shape[0]):
            torch.testing.assert_close(
                updated_expert_bias(bias[row], counts[row], rate),
                moe_utils.get_updated_expert_bias(counts[row].clone(), bias[row].clone(), rate),
                rtol=0,
                atol=0,
            )
    assert len(megatron_without_collectives) == 2 + 2 * counts.shape[0]  # the patch was in the path
