"""All-to-all overlapped with expert compute (``model.moe.a2a_overlap_chunks``), on 2 CPU ranks (gloo).

Each case builds one MoE layer from a seed twice, at EP=2: serial (chunks 1) and overlapped (chunks
2, 3, and 8, which uses E/P = 4), runs both on the same tokens and compares output, input gradient,
router gradient and every expert gradient. Chunking is by local expert, so every expert computes
the same rows in the same order as on the serial path and each weight gradient comes from one
chunk: with the default CPU expert kernel the results must be bitwise equal. The ranks run with
``MKL_CBWR=COMPATIBLE`` (MKL's conditional numerical reproducibility): without it MKL's GEMMs take
code paths that depend on the operands' memory alignment, and a chunk's rows start at other
addresses than the serial path's, which moves results by a few ulps (``moe bench ep`` prints that
difference). The "loop" backend runs torch's elementwise activations over all of a call's rows,
whose vectorised loops treat an element by its position, so it is held to ``RTOL`` of each tensor's
largest magnitude (about 80 float32 ulps; a wrong, lost or doubled row is off by order 1).
Routing cases: learned top-2, the fixed random router with bias and top-3 GELU experts, everything
skewed to rank 0 (rank 1 receives nothing, whole chunks are empty), a handful of tokens (blocks of
fewer rows than chunks, zero-row blocks), capacity drops, and the "loop" backend.

That the exchange really runs beside the experts is checked on the schedule: whenever the experts
compute a chunk, forward or backward, an exchange issued before it has not been waited on yet. And
the overlapped exchanges, like the serial ones, hand their process group only tensors on its device
(a group that, like NCCL, rejects the model's device: ``tests/parallel/device_group.py``).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe import MoEConfig, MoELayer
from moe.errors import UserError
from tests.runs import TINY, free_port

CHUNKS = (2, 3, 8)
RTOL = 1e-5
CASES = {
    "learned_top2": dict(config=dict(router="learned", top_k=2), tokens=(37, 38)),
    "random_bias_gelu_top3": dict(config=dict(router="random", balance="bias", top_k=3, activation="gelu"),
                                  tokens=(37, 38)),
    # every token chooses experts of rank 0: rank 1 receives no rows, rank 1's experts form empty chunks
    "skewed_to_rank0": dict(config=dict(router="learned", balance="bias", top_k=2), tokens=(37, 38), skew=True),
    # 3 and 1 tokens, top-1: most (source, destination, chunk) blocks hold fewer rows than chunks, many none
    "few_tokens_top1": dict(config=dict(router="learned", top_k=1), tokens=(3, 1)),
    "capacity_probs": dict(config=dict(router="learned", top_k=2, capacity_factor=0.5), tokens=(37, 38)),
    "loop_backend": dict(config=dict(router="learned", top_k=2, expert_backend="loop"), tokens=(37, 38), exact=False),
}


def _tokens(rank: int, count: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(count, hidden, generator=gen), torch.randn(count, hidden, generator=gen)


def _run_layer(options: dict, chunks: int, groups, rank: int) -> dict:
    from parallel.expert_parallel import apply_expert_parallel

    config = MoEConfig(hidden_size=12, ffn_hidden_size=10, num_experts=8, a2a_overlap_chunks=chunks,
                       **options["config"])
    torch.manual_seed(0)
    layer = MoELayer(config, layer_idx=3).train()
    if options.get("skew"):
        with torch.no_grad():
            layer.router.expert_bias[:4] = 100.0
    apply_expert_parallel(layer, groups)
    x, g = _tokens(rank, options["tokens"][rank], config.hidden_size)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    grads = {"output": y.detach(), "input": x.grad}
    for name, param in layer.named_parameters():
        if param.grad is not None:
            grads[name] = param.grad
    stats = layer.dispatcher.stats
    return {"tensors": grads, "rows_received": stats.rows_received, "bytes_sent": stats.bytes_sent,
            "rows_sent": stats.rows_sent, "calls": stats.calls, "chunks": layer.dispatcher.chunks}


def _compare(reference: dict, ours: dict) -> dict:
    out = {}
    for name, expected in reference["tensors"].items():
        got = ours["tensors"].get(name)
        if got is None:
            out[name] = None
            continue
        out[name] = {"equal": bool(torch.equal(got, expected)),
                     "max_diff": float((got - expected).abs().max()) if got.numel() else 0.0,
                     "scale": float(expected.abs().max()) if expected.numel() else 0.0}
    missing = set(ours["tensors"]) - set(reference["tensors"])
    return {"tensors": out, "extra": sorted(missing),
            **{key: [reference[key], ours[key]] for key in ("rows_received", "rows_sent", "bytes_sent", "calls",
                                                            "chunks")}}


def _schedule_log(rank: int, groups) -> dict:
    """Run one overlapped layer with its exchanges and expert computes logged in order."""
    import itertools

    from parallel import dispatcher

    events, counter = [], itertools.count()
    start, wait = dispatcher._Pending.__init__, dispatcher._Pending.wait
    functional_call, grad = torch.func.functional_call, torch.autograd.grad

    def logged_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        self.number = next(counter)
        events.append(("issue", self.number))

    def logged_wait(self):
        wait(self)
        events.append(("wait", self.number))

    def logged_forward(*args, **kwargs):
        events.append(("experts", "forward"))
        return functional_call(*args, **kwargs)

    def logged_backward(*args, **kwargs):
        events.append(("experts", "backward"))
        return grad(*args, **kwargs)

    dispatcher._Pending.__init__, dispatcher._Pending.wait = logged_start, logged_wait
    torch.func.functional_call, torch.autograd.grad = logged_forward, logged_backward
    try:
        _run_layer(CASES["learned_top2"], 4, groups, rank)
    finally:
        dispatcher._Pending.__init__, dispatcher._Pending.wait = start, wait
        torch.func.functional_call, torch.autograd.grad = functional_call, grad
    in_flight, at_experts = set(), []
    for kind, what in events:
        if kind == "issue":
            in_flight.add(what)
        elif kind == "wait":
            in_flight.discard(what)
        else:
            at_experts.append([what, len(in_flight)])
    return {"at_experts": at_experts, "issued": sum(kind == "issue" for kind, _ in events)}


def _single_rank_ep(rank: int) -> dict:
    """EP over a group of one rank: chunks 3 against chunks 1."""
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.groups import ExpertParallelGroups

    solo = [dist.new_group([r]) for r in (0, 1)][rank]  # every rank makes every group
    groups = ExpertParallelGroups(size=1, rank=0, group=solo, data_parallel_group=None, data_parallel_size=1,
                                  name="ep_size_1")
    results = []
    for chunks in (1, 3):
        config = MoEConfig(hidden_size=12, ffn_hidden_size=10, num_experts=8, top_k=2, a2a_overlap_chunks=chunks)
        torch.manual_seed(0)
        layer = MoELayer(config).train()
        apply_expert_parallel(layer, groups)
        x, g = _tokens(rank, 20, 12)
        x.requires_grad_(True)
        y = layer(x)
        (y * g).sum().backward()
        results.append([y.detach(), x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)])
    chunks, calls = layer.dispatcher.chunks, layer.dispatcher.stats.calls
    return {"equal": all(torch.equal(a, b) for a, b in zip(*results)) and len(results[0]) == len(results[1]),
            "chunks": chunks, "calls": calls}


def _strict_device(rank: int, world: int) -> dict:
    """Serial and overlapped (3 chunks) over a group that takes tensors on the lazy device only."""
    from parallel.groups import ExpertParallelGroups
    from tests.parallel import device_group

    device_group.start_lazy_device()
    device_group.register()
    strict = dist.new_group(list(range(world)), backend=device_group.BACKEND)
    groups = ExpertParallelGroups(size=world, rank=rank, group=strict, data_parallel_group=None, data_parallel_size=1,
                                  name=f"ep_size_{world}")
    serial = _run_layer(CASES["learned_top2"], 1, groups, rank)
    overlapped = _run_layer(CASES["learned_top2"], 3, groups, rank)
    same = all(torch.equal(serial["tensors"][name], tensor) for name, tensor in overlapped["tensors"].items())
    return {"equal": same,
            "chunks": overlapped["chunks"],
            "calls": [[name, devices] for name, devices in device_group.LazyStrictGroup.calls]}


def _lined_up(rank: int, groups) -> dict:
    """The serial layer with ``line_up`` (moe bench ep --line-up): rank 1 starts 0.3 s late, so rank 0
    waits that long before its first exchange; lined up, the wait is counted apart from the exchange."""
    import time

    from parallel.expert_parallel import apply_expert_parallel, exchange_stats, line_up_exchanges

    options = CASES["learned_top2"]
    serial = _run_layer(options, 1, groups, rank)
    config = MoEConfig(hidden_size=12, ffn_hidden_size=10, num_experts=8, **options["config"])
    found = {}
    for line_up in (False, True):
        torch.manual_seed(0)
        layer = apply_expert_parallel(MoELayer(config, layer_idx=3).train(), groups)
        line_up_exchanges(layer, line_up)
        x, g = _tokens(rank, options["tokens"][rank], config.hidden_size)
        x.requires_grad_(True)
        dist.barrier()
        if rank == 1:
            time.sleep(0.3)
        y = layer(x)
        (y * g).sum().backward()
        tensors = {"output": y.detach(), "input": x.grad,
                   **{name: p.grad for name, p in layer.named_parameters() if p.grad is not None}}
        stats = exchange_stats(layer)
        found[str(line_up)] = {"equal": all(torch.equal(serial["tensors"][k], v) for k, v in tensors.items()),
                               "seconds": stats["seconds"], "wait_seconds": stats["wait_seconds"],
                               "calls": stats["calls"]}
    return found


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from parallel.groups import ExpertParallelGroups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        groups = ExpertParallelGroups(size=world, rank=rank, group=dist.group.WORLD, data_parallel_group=None,
                                      data_parallel_size=1, name=f"ep_size_{world}")
        result = {}
        for name, options in CASES.items():
            serial = _run_layer(options, 1, groups, rank)
            for chunks in CHUNKS:
                result[f"{name}/{chunks}"] = _compare(serial, _run_layer(options, chunks, groups, rank))
        result["schedule"] = _schedule_log(rank, groups)
        result["single_rank_ep"] = _single_rank_ep(rank)
        result["strict_device"] = _strict_device(rank, world)
        result["lined_up"] = _lined_up(rank, groups)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("overlap")
    before = os.environ.get("MKL_CBWR")
    os.environ["MKL_CBWR"] = "COMPATIBLE"  # read by the spawned ranks' MKL; see the module docstring
    try:
        mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    finally:
        if before is None:
            del os.environ["MKL_CBWR"]
        else:
            os.environ["MKL_CBWR"] = before
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_overlapped_layer_equals_the_serial_layer(ranks, case, chunks):
    exact = CASES[case].get("exact", True)
    for rank, result in enumerate(ranks):
        r = result[f"{case}/{chunks}"]
        assert not r["extra"], r
        for name, diff in r["tensors"].items():
            assert diff is not None, (rank, name, "gradient missing with overlap")
            if exact:
                assert diff["equal"], (rank, name, diff)
            else:
                assert diff["max_diff"] <= RTOL * diff["scale"], (rank, name, diff)
        assert r["chunks"] == [1, min(chunks, 4)]  # at most one chunk per local expert (E/P = 4)
        for key in ("rows_received", "rows_sent", "bytes_sent"):  # the same traffic, counted the same
            assert r[key][0] == r[key][1], (rank, key, r[key])
        # each chunk's dispatch and combine, forward and backward (the counts exchange is not counted)
        assert r["calls"] == [4, 4 * min(chunks, 4)], r["calls"]


def test_uneven_cases_really_are_uneven(ranks):
    skewed = [r["skewed_to_rank0/2"] for r in ranks]
    assert skewed[1]["rows_received"][0] == 0 and skewed[0]["rows_received"][0] > 0
    few = [r["few_tokens_top1/3"] for r in ranks]
    assert sum(r["rows_sent"][0] for r in few) <= 4  # at most 4 rows cross over 8 experts in 3 chunks


def test_exchanges_are_in_flight_while_experts_compute(ranks):
    for result in ranks:
        log = result["schedule"]
        forward = [n for what, n in log["at_experts"] if what == "forward"]
        backward = [n for what, n in log["at_experts"] if what == "backward"]
        assert len(forward) == len(backward) == 4, log
        assert all(n >= 1 for n in forward + backward), log  # a serial schedule would show 0 each time
        assert log["issued"] == 16


def test_every_exchange_gets_tensors_on_the_groups_device(ranks):
    for result in ranks:
        r = result["strict_device"]
        assert r["equal"] and r["chunks"] == 3, r
        assert len(r["calls"]) == 2 + 4 + 4 * 3, r["calls"]  # counts twice, serial rows, then 3 chunks' rows
        assert all(devices == ["lazy"] for _, devices in r["calls"]), r["calls"]


def test_chunks_at_ep1_are_a_no_op(ranks):
    for result in ranks:
        r = result["single_rank_ep"]
        assert r["equal"] and r["chunks"] == 1 and r["calls"] == 4, r


def test_lined_up_exchanges_count_the_waiting_apart_and_change_no_result(ranks):
    plain, lined_up = ranks[0]["lined_up"]["False"], ranks[0]["lined_up"]["True"]
    assert plain["equal"] and lined_up["equal"]
    assert plain["calls"] == lined_up["calls"] > 0
    assert plain["wait_seconds"] == 0.0 and plain["seconds"] >= 0.25  # rank 1's late start falls inside an exchange
    assert lined_up["wait_seconds"] >= 0.25 and lined_up["seconds"] < plain["seconds"] - 0.2  # ...or in the barrier


def test_chunks_without_expert_parallelism_change_nothing():
    outputs = []
    for chunks in (1, 3):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(hidden_size=12, ffn_hidden_size=10, num_experts=8, a2a_overlap_chunks=chunks))
        x = torch.randn(9, 12, generator=torch.Generator().manual_seed(5))
        outputs.append(layer(x))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_chunks_below_one_or_not_an_integer_are_rejected(bad):
    expected = f"MoEConfig.a2a_overlap_chunks={bad!r} is invalid: expected an integer >= 1"
    with pytest.raises(UserError, match=re.escape(expected)):
        MoEConfig(a2a_overlap_chunks=bad)


def test_chunks_from_a_run_config(tmp_path):
    from launch.config import load_run_config

    assert load_run_config(TINY, ["model.moe.a2a_overlap_chunks=4"]).model.moe.a2a_overlap_chunks == 4
    with pytest.raises(UserError, match="a2a_overlap_chunks=0 is invalid"):
        load_run_config(TINY, ["model.moe.a2a_overlap_chunks=0"])


def test_the_dispatcher_checks_its_chunks():
    from parallel.dispatcher import AllToAllDispatcher
    from parallel.groups import ExpertParallelGroups

    groups = ExpertParallelGroups(size=2, rank=0, group=None, data_parallel_group=None, data_parallel_size=1,
                                  name="ep_size_2")
    with pytest.raises(UserError, match="a2a_overlap_chunks=0 is invalid"):
        AllToAllDispatcher(8, groups, overlap_chunks=0)
    with pytest.raises(ValueError, match="needs the experts module"):
        AllToAllDispatcher(8, groups, overlap_chunks=2)
    assert AllToAllDispatcher(8, groups, overlap_chunks=3, experts=torch.nn.Identity()).chunks == 3
    assert AllToAllDispatcher(4, groups, overlap_chunks=3, experts=torch.nn.Identity()).chunks == 2  # E/P = 2


def test_bench_ep_chunks_option():
    from launch.bench.ep import parse_chunks

    assert parse_chunks("2,4") == [2, 4] and parse_chunks("none") == []
    for bad in ("1", "2,2", "x", "", "0,3"):
        with pytest.raises(UserError, match="--chunks .* is invalid"):
            parse_chunks(bad)
