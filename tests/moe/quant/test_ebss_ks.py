"""EBSS at several ks: one k given as a list is the one-k search bit for bit; with several, the
scores equal a naive re-scoring that averages the log-likelihood and the balance over the ks."""

from __future__ import annotations

import pytest
import torch

import moe
from moe.errors import UserError
from moe.quant.ebss import ebss_search, expert_balance_sigma, expert_usage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = moe.ModelConfig(num_layers=2, num_heads=2, max_seq_len=32, init_std=0.2, moe=moe.MoEConfig(
        hidden_size=32, ffn_hidden_size=16, num_experts=[4, 6], top_k=2, router="random"))
    return moe.MoETransformer(config).eval()




def _log_likelihood(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64: sum over positions 2.. of log P(token | prefix), one full forward."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens).float(), dim=-1).double()  # [B, S, V]
    return log_probs[:, :-1].gather(2, tokens[:, 1:, None]).squeeze(-1).sum(dim=1)


def test_one_k_as_a_list_is_the_one_k_search(model):
    moe.set_active_experts(model, 3)
    first = torch.tensor([5, 77, 200])
    plain = ebss_search(model, 3, 10, width=3, first_tokens=first)
    moe.set_active_experts(model, 1)  # the list sets k itself, and restores the model's
    listed = ebss_search(model, 3, 10, width=3, first_tokens=first, ks=[3])
    assert [layer.active_experts for _, layer in moe.moe_layers(model)] == [1, 1]
    for name in ("tokens", "log_likelihood", "score", "parent_sigma", "branches", "branch_scores"):
        assert torch.equal(getattr(plain, name), getattr(listed, name)), name
    with pytest.raises(UserError, match="ks is empty"):
        ebss_search(model, 1, 4, first_tokens=first[:1], ks=[])


def test_several_ks_score_the_mean_over_the_ks(model):
    """Eq. 13 recomputed from scratch at each k (one full forward per k, usage from expert_usage),
    both terms averaged over the ks; and the data differ from those of either k alone."""
    ks, tau, seq_len = [1, 4], 0.05, 12
    first = torch.tensor([9, 140])
    result = ebss_search(model, 2, seq_len, width=3, tau=tau, first_tokens=first, ks=ks)
    likelihoods, sigmas = [], []
    for k in ks:
        moe.set_active_experts(model, k)
        likelihoods.append(_log_likelihood(model, result.tokens))
        widths = [layer.num_experts for _, layer in moe.moe_layers(model)]
        sigmas.append([expert_balance_sigma(expert_usage(model, result.tokens[i : i + 1, :-1]), widths) for i in range(2)])
    mean_likelihood = sum(likelihoods) / len(ks)
    torch.testing.assert_close(result.log_likelihood, mean_likelihood, rtol=0, atol=1e-4)
    for i in range(2):
        parent_sigma = sum(s[i] for s in sigmas) / len(ks)
        assert result.parent_sigma[i].item() == pytest.approx(parent_sigma, abs=1e-9)
        score = -float(mean_likelihood[i]) / seq_len + parent_sigma / tau
        assert result.score[i].item() == pytest.approx(score, abs=1e-4)
    alone = []
    for k in ks:
        moe.set_active_experts(model, k)
        alone.append(ebss_search(model, 2, seq_len, width=3, tau=tau, first_tokens=first).tokens)
    assert not torch.equal(result.tokens, alone[0]) or not torch.equal(result.tokens, alone[1])
