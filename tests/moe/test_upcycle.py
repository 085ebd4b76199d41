"""Upcycling a dense model into an MoE: copies of the FFN give exactly the dense function at init
for any router and k; fine-grained slices give it when every slice is chosen with equal weights;
noise breaks the copies' symmetry; what is not a dense model is refused."""

from __future__ import annotations

import pytest
import torch

import moe
from moe import ModelConfig, MoEConfig, MoETransformer
from moe.errors import UserError
from moe.upcycle import upcycle


def _dense(width: int = 24) -> MoETransformer:
    """Blocks 0 and 2: one-expert MoE layers; blocks 1 and 3: DenseFFN; all SwiGLU of one width."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, num_layers=4, num_heads=2, max_seq_len=32, moe_every=2,
                         dense_ffn_hidden_size=width,
                         moe=MoEConfig(hidden_size=16, ffn_hidden_size=width, num_experts=1, top_k=1,
                                       router="learned"))
    return MoETransformer(config).eval()


@pytest.mark.parametrize("router", ["random", "learned"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_copies_compute_the_dense_function_at_any_k(router, k):
    dense = _dense()
    sparse = upcycle(dense, num_experts=4, router=router)
    assert all(isinstance(block.ffn, moe.MoELayer) and block.ffn.num_experts == 4 for block in sparse.blocks)
    moe.set_active_experts(sparse, k)
    ids = torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_slices_compute_the_dense_function_when_every_slice_is_chosen_with_equal_weight():
    dense = _dense()
    sparse = upcycle(dense, num_experts=3, granularity=3, router="learned", router_init_std=0.0)  # k = 3
    layer = sparse.blocks[0].ffn
    assert layer.experts.w1.shape == (3, 16, 8) and layer.active_experts == 3
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids), dense(ids), rtol=1e-5, atol=1e-5)
    # expert e holds slice e of the dense hidden units; w2 carries the factor G that 1/G gates undo
    dense_w1 = dense.blocks[1].ffn.w1.weight.t()
    torch.testing.assert_close(sparse.blocks[1].ffn.experts.w1[2], dense_w1[:, 16:24])
    torch.testing.assert_close(sparse.blocks[1].ffn.experts.w2[2], 3 * dense.blocks[1].ffn.w2.weight.t()[16:24])


def test_noise_makes_the_copies_differ_and_keeps_them_close():
    dense = _dense()
    sparse = upcycle(dense, num_experts=4, noise=0.01, seed=3)
    w1 = sparse.blocks[1].ffn.experts.w1
    assert not torch.equal(w1[0], w1[1])
    reference = dense.blocks[1].ffn.w1.weight.t()
    assert ((w1 - reference).std() / reference.std()).item() == pytest.approx(0.01, rel=0.2)
    again = upcycle(dense, num_experts=4, noise=0.01, seed=3)
    assert torch.equal(again.blocks[1].ffn.experts.w1, w1)  # seeded


def test_the_rest_of_the_model_is_copied_unchanged():
    dense = _dense()
    sparse = upcycle(dense, num_experts=2)
    for name, tensor in dense.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(sparse.state_dict()[name], tensor), name
    assert sparse.config.moe_every == 1 and sparse.config.moe.router == "random"


def test_what_is_not_a_dense_model_is_refused():
    torch.manual_seed(0)
    moe_model = MoETransformer(ModelConfig(num_layers=2, num_heads=2, max_seq_len=16,
                                           moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)))
    with pytest.raises(UserError, match="not a dense SwiGLU FFN"):
        upcycle(moe_model, num_experts=8)
    with pytest.raises(UserError, match="different widths"):
        upcycle(_dense_mixed(), num_experts=4)
    with pytest.raises(UserError, match="must divide"):
        upcycle(_dense(), num_experts=4, granularity=5)
    with pytest.raises(UserError, match="--experts"):
        upcycle(_dense(), num_experts=1)
    with pytest.raises(UserError, match="--noise"):
        upcycle(_dense(), num_experts=2, noise=-1.0)


def _dense_mixed() -> MoETransformer:
    config = ModelConfig(vocab_size=64, num_layers=2, num_heads=2, max_seq_len=16, moe_every=2,
                         dense_ffn_hidden_size=12,
                         moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=1, top_k=1))
    return MoETransformer(config)
