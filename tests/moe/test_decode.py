"""The fixed-shape decode path (moe.decode): the static KV cache gives the logits of the growing
cache and of the full forward, the step compiles with fullgraph=True and is not recompiled as the
position moves, the capacity is enforced, and on a GPU the captured CUDA graph replays the eager
step without a host sync."""

from __future__ import annotations

import pytest
import torch

import moe
from moe import ModelConfig, MoEConfig, MoETransformer
from moe.decode import StaticDecoder, StaticKVCache
from moe.errors import UserError
from moe.model import KVCache


def _model(num_layers=2, max_seq_len=40, **moe_options) -> MoETransformer:
    options = dict(hidden_size=32, ffn_hidden_size=24, num_experts=4, top_k=2, router="random", balance="bias")
    options.update(moe_options)
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(num_layers=num_layers, num_heads=4, max_seq_len=max_seq_len,
                                      moe=MoEConfig(**options))).eval()


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1, keepdim=True)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_static_steps_give_the_logits_of_the_growing_cache(k):
    model = _model()
    moe.set_active_experts(model, k)
    prompt = torch.randint(0, 256, (3, 6))
    decoder = StaticDecoder(model, batch_size=3, capacity=20)
    dynamic = KVCache(len(model.blocks))
    with torch.no_grad():
        static_logits = decoder.prefill(prompt)
        dynamic_logits = model(prompt, cache=dynamic)[:, -1]
        for _ in range(10):
            torch.testing.assert_close(static_logits, dynamic_logits, rtol=1e-5, atol=1e-5)
            token = _greedy(dynamic_logits)
            static_logits = decoder.step(token)
            dynamic_logits = model(token, cache=dynamic)[:, -1]
    assert decoder.position == 16 and int(decoder.cache.length) == 16


def test_static_prefill_and_chunks_equal_the_full_forward():
    model = _model()
    tokens = torch.randint(0, 256, (2, 18))
    cache = StaticKVCache.for_model(model, batch_size=2, capacity=24)  # more room than used: masked out
    with torch.no_grad():
        full = model(tokens)
        pieces = [model(tokens[:, :5], cache=cache)]
        pieces += [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 11)]
        pieces.append(model(tokens[:, 11:], cache=cache))
    assert cache.filled == 18 and int(cache.length) == 18
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_takes_the_static_path_and_equals_the_growing_cache():
    model = _model()
    prompt = torch.randint(0, 256, (2, 5))
    calls = []
    original = StaticDecoder.step
    StaticDecoder.step = lambda self, tokens: calls.append(1) or original(self, tokens)
    try:
        static = model.generate(prompt, 12, active_experts=2, temperature=0)
    finally:
        StaticDecoder.step = original
    growing = model.generate(prompt, 12, active_experts=2, temperature=0, static_cache=False)
    assert len(calls) == 11  # the first new token comes from the prefill
    assert torch.equal(static, growing) and static.shape == (2, 17)


def test_the_cache_refuses_what_does_not_fit():
    model = _model(max_seq_len=16)
    decoder = StaticDecoder(model, batch_size=2, capacity=8)
    with pytest.raises(UserError, match="expected input_ids"):
        decoder.prefill(torch.zeros(3, 4, dtype=torch.long))
    decoder.prefill(torch.zeros(2, 7, dtype=torch.long))
    decoder.step(torch.zeros(2, 1, dtype=torch.long))  # position 8 of 8
    with pytest.raises(UserError, match="all 8 positions"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(UserError, match="expected tokens"):
        decoder.step(torch.zeros(2, 2, dtype=torch.long))
    cache = StaticKVCache.for_model(model, batch_size=1, capacity=4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(UserError, match="exceeds the static KV cache"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="cuda_graph=True needs a model on a CUDA device"):
        StaticDecoder(model, batch_size=1, capacity=4, cuda_graph=True)


def test_the_compiled_step_has_no_graph_break_and_is_not_recompiled_as_the_position_moves():
    import torch._dynamo

    torch._dynamo.reset()
    model = _model(num_layers=1)
    prompt = torch.randint(0, 256, (2, 4))
    eager = StaticDecoder(model, batch_size=2, capacity=16)
    compiled = StaticDecoder(model, batch_size=2, capacity=16, compile=True)  # fullgraph=True: a break raises
    with torch.no_grad():
        expected, got = eager.prefill(prompt), compiled.prefill(prompt)
        token = _greedy(expected)
        got = compiled.step(token).clone()  # the one compilation
        expected = eager.step(token)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(5):
                token = _greedy(expected)
                got, expected = compiled.step(token).clone(), eager.step(token)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert compiled.position == eager.position == 10


def test_a_static_cache_lives_on_the_models_device_in_its_dtype():
    model = _model().to(torch.bfloat16)
    cache = StaticKVCache.for_model(model, batch_size=2, capacity=8)
    weight = model.embed.weight
    assert cache.key_buffer.dtype == torch.bfloat16 and cache.key_buffer.device == weight.device
    assert {t.device for t in (cache.value_buffer, cache.length, cache._offsets)} == {weight.device}


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replay_equals_the_eager_step_and_never_syncs(compile):
    model = _model(num_layers=2, max_seq_len=64).cuda().to(torch.bfloat16)
    prompt = torch.randint(0, 256, (4, 8), device="cuda")
    eager = StaticDecoder(model, batch_size=4, capacity=40, cuda_graph=False)
    graphed = StaticDecoder(model, batch_size=4, capacity=40, cuda_graph=True, compile=compile)
    with torch.no_grad():
        expected, got = eager.prefill(prompt), graphed.prefill(prompt)
        for k in (1, 4, 2):  # a graph per k, captured on first use
            moe.set_active_experts(model, k)
            for _ in range(4):
                token = _greedy(expected)
                got = graphed.step(token).clone()
                torch.cuda.set_sync_debug_mode("error")  # any host sync in the eager step raises
                try:
                    expected = eager.step(token)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert len(graphed._graphs) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_the_gpu_uses_graphs_and_equals_the_growing_cache():
    model = _model(num_layers=2, max_seq_len=64).cuda()  # fp32: greedy choices are stable
    prompt = torch.randint(0, 256, (2, 6), device="cuda")
    static = model.generate(prompt, 20, active_experts=3, temperature=0)
    growing = model.generate(prompt, 20, active_experts=3, temperature=0, static_cache=False)
    assert torch.equal(static, growing)
