"""The MoE language model: shapes, causality, rotary, config, training signal, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe
from moe import MoEConfig, MoETransformer, ModelConfig
from moe.model import apply_rotary, rotary_table


def _config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64, num_layers=3, num_heads=2, max_seq_len=32,
        moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, router="random", balance="bias"),
    )
    base.update(overrides)
    return ModelConfig(**base)


def test_logits_shape_loss_and_tied_embeddings():
    torch.manual_seed(0)
    model = MoETransformer(_config())
    ids = torch.randint(0, 64, (2, 10))
    logits, loss = model(ids, labels=ids)
    assert logits.shape == (2, 10, 64)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1)))
    assert model.lm_head.weight is model.embed.weight
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # near uniform at init


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = MoETransformer(_config()).eval()
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    torch.testing.assert_close(model(ids)[0, :8], model(changed)[0, :8])
    assert not torch.allclose(model(ids)[0, 8:], model(changed)[0, 8:])


def test_rotary_is_a_rotation_with_relative_positions():
    table = rotary_table(8, 16, 10000.0)
    q, k = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    q_rot = apply_rotary(q, table)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))  # norms kept
    # The score of (position i, position j) depends only on i - j: shift both by 3.
    same_q, same_k = q[:, :, :1].expand(1, 1, 16, 8), k[:, :, :1].expand(1, 1, 16, 8)
    qs, ks = apply_rotary(same_q, table), apply_rotary(same_k, table)
    torch.testing.assert_close((qs[0, 0, 5] * ks[0, 0, 2]).sum(), (qs[0, 0, 8] * ks[0, 0, 5]).sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotates_each_pair_by_its_positions_angle(dtype):
    """RoFormer's formula, pair by pair: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), angle p * theta^(-2i/D)."""
    head_dim, positions = 6, 5
    table = rotary_table(head_dim, positions, 100.0)
    x = torch.randn(1, 2, positions, head_dim).to(dtype).transpose(1, 2).transpose(1, 2)
    out = apply_rotary(x, table).float()
    for p in range(positions):
        for i in range(head_dim // 2):
            angle = torch.tensor(p * 100.0 ** (-2 * i / head_dim), dtype=torch.float64)
            x0, x1 = x[0, :, p, 2 * i].double(), x[0, :, p, 2 * i + 1].double()
            expected = torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1)
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out[0, :, p, 2 * i : 2 * i + 2].double(), expected, atol=tolerance, rtol=tolerance)


def test_moe_every_and_distinct_random_routers():
    model = MoETransformer(_config(num_layers=4, moe_every=2))
    kinds = [type(block.ffn).__name__ for block in model.blocks]
    assert kinds == ["MoELayer", "DenseFFN", "MoELayer", "DenseFFN"]
    assert model.blocks[1].ffn.w1.out_features == 8 * 2  # ffn_hidden_size * top_k by default
    routers = [block.ffn.router.weight for block in model.blocks if isinstance(block.ffn, moe.MoELayer)]
    assert not torch.equal(routers[0], routers[1])


def test_training_lowers_loss_and_keeps_the_fixed_router():
    torch.manual_seed(0)
    model = MoETransformer(_config())
    routers = [block.ffn.router.weight.clone() for block in model.blocks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for step in range(30):
        moe.advance_k_schedule(model, step)
        _, loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        moe.update_expert_biases(model)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for block, before in zip(model.blocks, routers):
        assert torch.equal(block.ffn.router.weight, before)


def test_active_parameter_count():
    model = MoETransformer(_config())
    per_expert = 3 * 16 * 8
    assert model.num_parameters(active_k=4) == model.num_parameters()
    assert model.num_parameters() - model.num_parameters(active_k=1) == 3 * 3 * per_expert  # 3 layers, 3 idle experts


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=3), "must divide moe.hidden_size"),
        (dict(num_layers=0), "ModelConfig.num_layers=0"),
        (dict(rope_theta=-1.0), "ModelConfig.rope_theta=-1.0"),
        (dict(tie_embeddings="no"), "ModelConfig.tie_embeddings='no'"),
    ],
)
def test_model_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_model_config_from_dict_nested_and_unknown_keys():
    cfg = ModelConfig.from_dict({"num_layers": 2, "moe": {"hidden_size": 32, "num_experts": 4, "top_k": 1}})
    assert cfg.moe.num_experts == 4 and cfg.hidden_size == 32
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key\\(s\\) layers"):
        ModelConfig.from_dict({"layers": 2})
    with pytest.raises(ValueError, match="MoEConfig: unknown key\\(s\\) experts"):
        ModelConfig.from_dict({"moe": {"experts": 4}})


def test_sequence_longer_than_rotary_table_is_an_error():
    model = MoETransformer(_config())
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_rotary_angles_stay_fp32_in_a_bf16_model_and_compiled_rotary_gives_the_same_bits():
    model = MoETransformer(_config()).to(torch.bfloat16)
    assert model.rotary.dtype == torch.float32
    assert model(torch.randint(0, 64, (1, 6))).dtype == torch.bfloat16
    table = rotary_table(8, 16, 10000.0)
    x = torch.randn(2, 3, 16, 8)
    compiled = torch.compile(apply_rotary, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, table), apply_rotary(x, table))
