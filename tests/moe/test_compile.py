"""moe.compile_blocks: each transformer block compiled in place, the model's names and numbers unchanged.

Compiled and eager runs are compared in fp32 on CPU with Inductor. Tolerance: Inductor fuses the
elementwise work and the fp32 reductions (RMSNorm, softmax, the loss's logsumexp) and may reorder
them, which changes each result in its last bits (~1e-7 relative); on CPU it may also take another
expert path than eager (``expert_backend="auto"``), summing the same products in another order.
Over three blocks, forward and backward, that stays well below rtol=1e-4 / atol=1e-6, while a
wrong or missing term (a dropped auxiliary loss, a stale k, a gradient not reaching a parameter)
moves results by far more. The routing, a discrete choice, is compared exactly first, so a tie
broken differently cannot hide behind the tolerance.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe
from moe import MoEConfig, MoETransformer, ModelConfig, collect_aux_losses, compile_blocks, set_active_experts
from moe.layer import MoELayer
from moe.model import Block

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-4, 1e-6


def _config(router: str = "learned", balance: str = "aux_loss", num_layers: int = 3, moe_every: int = 2,
            num_experts: int = 4) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, num_layers=num_layers, num_heads=2, max_seq_len=16, moe_every=moe_every,
        moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=num_experts, top_k=2, router=router,
                      balance=balance, z_loss_coeff=1e-3),
    )


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits, loss = model(ids[:, :-1], labels=ids[:, 1:])
    aux = collect_aux_losses(model)
    (loss + aux).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    routing = [layer.last_routing.indices.clone() for layer in model.modules() if isinstance(layer, MoELayer)]
    return logits.detach(), loss.detach(), aux.detach(), grads, routing


@pytest.mark.parametrize("router,balance,num_layers,ks", [("learned", "aux_loss", 3, (2,)), ("random", "bias", 1, (2, 3))])
def test_compiled_blocks_give_the_eager_loss_gradients_and_routing(router, balance, num_layers, ks):
    """The learned router with MoE and dense blocks (moe_every=2); the fixed random router with bias
    balancing, at a second k that recompiles: the same routing, logits, losses, gradients and
    balancing state as eager."""
    torch.manual_seed(0)
    eager = MoETransformer(_config(router, balance, num_layers=num_layers))
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == [f"blocks.{i}" for i in range(num_layers)]
    ids = torch.randint(0, 64, (2, 9))
    for k in ks:
        set_active_experts(eager, k)
        set_active_experts(compiled, k)
        expected, got = _loss_and_grads(eager, ids), _loss_and_grads(compiled, ids)
        for want, have in zip(expected[4], got[4]):  # routing: exact
            assert want.shape[1] == k and torch.equal(want, have)
        for want, have in zip(expected[:3], got[:3]):  # logits, loss, auxiliary + z-loss
            torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL)
        assert expected[3].keys() == got[3].keys() and len(got[3]) == len(list(eager.parameters()))
        for name, grad in expected[3].items():
            torch.testing.assert_close(got[3][name], grad, rtol=RTOL, atol=ATOL, msg=name)
    if balance == "bias":  # the routers counted the same tokens inside the compiled graphs
        for mine, theirs in zip(eager.modules(), compiled.modules()):
            if isinstance(mine, MoELayer):
                assert mine.router.pending_tokens.sum() == 2 * 8 * sum(ks)
                assert torch.equal(mine.router.pending_tokens, theirs.router.pending_tokens)


def test_state_dict_keys_and_parameters_are_unchanged():
    """Compiled in place: the same parameter objects under the same names, and a state dict that
    loads both ways with strict=True (so DeepSpeed checkpoints and exports are unchanged)."""
    torch.manual_seed(0)
    model = MoETransformer(_config())
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    names = compile_blocks(model, backend="eager")
    assert names == [f"blocks.{i}" for i in range(3)]
    assert all(isinstance(model.get_submodule(name), Block) for name in names)  # not wrapped
    assert list(model.state_dict()) == keys
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    torch.manual_seed(1)
    other = MoETransformer(_config())
    model.load_state_dict(other.state_dict(), strict=True)
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(model(ids), other(ids), rtol=RTOL, atol=ATOL)
    other.load_state_dict(model.state_dict(), strict=True)


def test_one_graph_serves_every_block():
    """Dynamo treats a block's parameters as inputs: a deeper model compiles no more graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = []
    for layers in (1, 4):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = MoETransformer(_config(num_layers=layers, moe_every=1))
        compile_blocks(model, backend="aot_eager")
        _, loss = model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0], graphs


def test_every_k_up_to_E_keeps_its_compiled_graph():
    """k is specialised on: compile_blocks raises Dynamo's per-function cache limit (default 8) to
    hold every k of 1..E, in training and in no-grad evaluation."""
    import torch._dynamo.config as dynamo_config

    limit = getattr(dynamo_config, "recompile_limit", None) or dynamo_config.cache_size_limit
    model = MoETransformer(_config(num_experts=16))
    compile_blocks(model, backend="eager")
    now = getattr(dynamo_config, "recompile_limit", None) or dynamo_config.cache_size_limit
    assert now >= max(limit, 2 * 16)


def test_train_compile_is_a_validated_boolean_of_the_run_config():
    from launch.config import TrainConfig, load_run_config

    tiny = REPO / "configs" / "tiny.yaml"
    assert load_run_config(tiny).train.compile is False
    assert load_run_config(tiny, ["train.compile=true"]).train.compile is True
    for bad in ("1", "'true'", "null"):
        with pytest.raises(moe.errors.UserError, match=r"train\.compile=.* is invalid: expected true or false"):
            load_run_config(tiny, [f"train.compile={bad}"])
    with pytest.raises(ValueError, match=r"train\.compile=0 is invalid"):
        TrainConfig(compile=0)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(moe.errors.UserError, match="no transformer Block"):
        compile_blocks(torch.nn.Linear(2, 2))


DEEPSPEED_CHILD = textwrap.dedent(
    """
    import sys, torch
    import parallel.engine as engine
    from launch.config import load_run_config
    from moe import MoETransformer, collect_aux_losses, compile_blocks
    from parallel import checkpoint

    root = sys.argv[1]
    engine.init_distributed()
    cfg = load_run_config("configs/tiny.yaml", ["model.num_layers=2", "model.moe.router=learned",
                                                "train.precision=fp32", "train.micro_batch_size=2",
                                                "train.seq_len=16"])

    def build(compiled):
        torch.manual_seed(0)
        model = MoETransformer(cfg.model)
        if compiled:
            compile_blocks(model, backend="aot_eager")
        return engine.build_engine(model, cfg.deepspeed, cfg.train)

    def step(ds, ids):
        _, loss = ds(ids[:, :-1], labels=ids[:, 1:])
        aux = collect_aux_losses(ds.module)
        ds.backward(loss if aux is None else loss + aux)
        ds.step()
        return float(loss)

    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    eager, compiled = build(False), build(True)
    step(eager, ids)
    state = {"run_id": "x", "layout": checkpoint.current_layout(eager)}
    checkpoint.save(eager, root + "/eager", 1, state, cfg.to_dict())
    checkpoint.load(compiled, root + "/eager", checkpoint.tag_for_step(1))
    same = all(torch.equal(a, b) for a, b in zip(eager.module.state_dict().values(),
                                                 compiled.module.state_dict().values()))
    print("loaded equal", same)
    print("next losses", step(eager, ids), step(compiled, ids))
    checkpoint.save(compiled, root + "/compiled", 2, state, cfg.to_dict())
    saved = (("eager", checkpoint.tag_for_step(1)), ("compiled", checkpoint.tag_for_step(2)))
    portable = [sorted(checkpoint.model_state_dict(root + "/" + name, tag)) for name, tag in saved]
    own = [sorted(checkpoint._model_states(root + "/" + name, tag)["module"]) for name, tag in saved]
    print("checkpoint keys equal", portable[0] == portable[1] and own[0] == own[1], len(portable[0]), len(own[0]))
    print("module keys", own[0] == sorted(eager.module.state_dict()) == sorted(compiled.module.state_dict()))
    """
)


def test_a_deepspeed_checkpoint_moves_between_eager_and_compiled_models(tmp_path):
    """The trainer's checkpoint of an eager engine loads into an engine of the compiled model (the same
    weights, then the same next step), and the compiled engine writes the same names. One rank, gloo,
    in a child process (its process group stays out of this one)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "TRITON_INTERPRET")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_CHILD, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "loaded equal True" in result.stdout, result.stdout[-2000:]
    assert "checkpoint keys equal True" in result.stdout, result.stdout[-2000:]
    assert "module keys True" in result.stdout, result.stdout[-2000:]
    (losses,) = [line.split()[2:] for line in result.stdout.splitlines() if line.startswith("next losses")]
    eager_loss, compiled_loss = map(float, losses)
    assert abs(eager_loss - compiled_loss) <= RTOL * abs(eager_loss), losses
