"""`moe quantize --experts K,K,...` (calibration at several ks, Hessians summed) and `--eora RANK`
(EoRA's low-rank correction, exported and folded in on loading), on a tiny random model.

The Ray side of the pipeline is covered by tests/launch/test_quantize.py; here the same job runs
with every task executed at once in this process (:class:`InProcessCluster`), which keeps these
tests to seconds: what they check is the calibration's arithmetic, the export and the command."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moe
import launch.quantize.cluster as cluster_module
from launch.cli import main
from launch.quantize.compare import compare, compare_table
from launch.quantize.job import QuantizeOptions, parse_experts, quantize_model
from moe.quant import QuantizedWeight, QuantSpec, unpack_codes
from moe.errors import UserError
from moe.quant.calibrate import stage_targets

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(num_layers=3, num_heads=2, max_seq_len=32, moe_every=2, init_std=0.1, moe=dict(
    hidden_size=32, ffn_hidden_size=16, num_experts=[2, 4], top_k=2, router="random", num_shared_experts=1))
"""Blocks 0 and 2 MoE (2 and 4 experts, one shared expert), block 1 a dense FFN."""


class Ref:
    """An object reference of :class:`InProcessCluster` (hashable, as Ray's are)."""

    def __init__(self, value):
        self.value = value


class InProcessRay:
    """The part of the ``ray`` module the job uses with a cluster: ``wait``."""

    @staticmethod
    def wait(refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]


class InProcessCluster:
    """``launch.quantize.cluster.Cluster``'s interface, each task run at once in this process (its
    reference arguments resolved, as Ray does); the arguments of every GPTQ solve are kept
    (``solves``), in the order they were submitted."""

    def __init__(self, ray=None, device: str = "cpu"):
        self.ray, self.device, self.tasks = InProcessRay(), device, 0
        self.solves: list[tuple] = []

    def submit(self, name: str, *args):
        self.tasks += 1
        args = tuple(arg.value if isinstance(arg, Ref) else arg for arg in args)
        if name in cluster_module.MODEL_TASKS:
            args = (*args, self.device)
        if name == "_solve_task":
            self.solves.append(args)
        return Ref(getattr(cluster_module, name)(*args))

    def get(self, refs):
        return [ref.value for ref in refs] if isinstance(refs, list) else refs.value

    def put(self, value):
        return Ref(value)


@pytest.fixture
def clusters(monkeypatch):
    """Quantization jobs in this process, without Ray; yields the list of clusters they used."""
    job_module = importlib.import_module("launch.quantize.job")
    compare_module = importlib.import_module("launch.quantize.compare")  # the package's `compare` is the function

    made: list[InProcessCluster] = []

    def make(ray, device="cpu"):
        made.append(InProcessCluster(ray, device))
        return made[-1]

    for module in (job_module, compare_module):
        monkeypatch.setattr(module, "ray_session", lambda *args, **kwargs: contextlib.nullcontext(None))
        monkeypatch.setattr(module, "Cluster", make)
        monkeypatch.setattr(module, "calibration_device", lambda ray, device=None: "cpu")
    monkeypatch.setattr(cluster_module, "_one_thread", lambda: None)  # leave this process's threads alone
    return made




@pytest.fixture(scope="module")
def fp_export(tmp_path_factory):
    torch.manual_seed(0)
    model = moe.MoETransformer(moe.ModelConfig(**CONFIG)).eval()
    path = tmp_path_factory.mktemp("fp") / "export"
    moe.save_pretrained(model, path)
    return path


def options(**changes) -> QuantizeOptions:
    values = dict(method="gptq", bits=4, calib="random", agq=True, experts=2, num_sequences=6, seq_len=16, shards=2)
    return QuantizeOptions(**{**values, **changes})


def calibration_ids(count: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (count, 16), generator=torch.Generator().manual_seed(seed))


def tensors_of(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# Several ks
# ------------------------------------------------------------------------------------------------


def test_a_single_k_list_is_the_single_k_path_bit_for_bit(fp_export, tmp_path, clusters):
    """``experts=[3]`` (EBSS calibration, AGQ) writes exactly the tensors ``experts=3`` writes."""
    small = dict(calib="ebss", experts=3, num_sequences=4, seq_len=12, ebss_width=2)
    for name, experts in (("int", 3), ("list", [3])):
        quantize_model(str(fp_export), str(tmp_path / name), options(**{**small, "experts": experts}), progress=False)
    one, listed = (tensors_of(tmp_path / name) for name in ("int", "list"))
    assert one.keys() == listed.keys()
    for name in one:
        assert torch.equal(one[name], listed[name]), name
    metas = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("int", "list")]
    assert metas[0]["quantization"]["calibration_ks"] == metas[1]["quantization"]["calibration_ks"] == [[2, 3]]
    assert metas[0]["active_experts"] == metas[1]["active_experts"] == [2, 3]  # a k above a layer's E is its E
    assert clusters[0].tasks == clusters[1].tasks


@torch.no_grad()
def naive_hessians(model, input_ids: torch.Tensor, layer_idx: int, stage: int, ks: list[int], agq: bool) -> dict:
    """``{key: sum over ks of X^T diag(c) X}`` for block ``layer_idx``'s stage-``stage`` inputs, in
    float64: the *whole* model run at each k in turn, the inputs caught by hooks on the block's
    modules, an expert's rows found from the router's top-k (not from the dispatcher's groups)."""
    block = model.blocks[layer_idx]
    total: dict = defaultdict(lambda: 0)

    def add(key, x, c=None):
        x = x.double().reshape(-1, x.shape[-1])
        weighted = x if c is None else x * c.double().reshape(-1, 1)
        total[key] = total[key] + weighted.T @ x

    caught: dict = {}
    modules = {"attn.qkv": block.attn.qkv, "attn.out": block.attn.out}
    if hasattr(block.ffn, "router"):
        modules.update({"router": block.ffn.router, "shared.in": block.ffn.shared_mlp.w1,
                        "shared.mid": block.ffn.shared_mlp.w2, "ffn": block.ffn})
    else:
        modules.update({"ffn.in": block.ffn.w1, "ffn.mid": block.ffn.w2})
    hooks = [module.register_forward_pre_hook(lambda m, args, key=key: caught.__setitem__(key, args[0]))
             for key, module in modules.items()]
    try:
        for k in ks:
            moe.set_active_experts(model, k)
            model(input_ids)
            if stage == 1:
                for key, x in caught.items():
                    if key != "ffn":
                        add(key, x)
                continue
            x = caught["ffn"].reshape(-1, caught["ffn"].shape[-1])  # [T, d]
            routing, experts = block.ffn.last_routing, block.ffn.experts
            for e in range(experts.num_experts):
                chosen = routing.indices == e  # [T, k]
                token = chosen.any(dim=1)
                gate = (routing.weights * chosen).sum(dim=1)[token] if agq else None
                xe = x[token]
                mid = F.silu(xe @ experts.w1[e]) * (xe @ experts.w3[e])
                add(f"experts.in.{e}", xe, gate)
                add(f"experts.mid.{e}", mid, gate)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(total)


def test_summed_hessians_equal_a_naive_loop_over_the_ks(fp_export, tmp_path, clusters):
    """Every GPTQ solve of a two-k job (AGQ, EoRA on, a dense block, a shared expert, 2 and 4
    experts) received the sum over the ks of the naive Hessians of the model as it stood at that
    point: the blocks and stages before quantized (with their EoRA corrections), the rest not."""
    ks, ids = [1, 3], calibration_ids()
    quantize_model(str(fp_export), str(tmp_path / "q"), options(experts=ks, eora=2), calibration=ids, progress=False)
    solves = iter(clusters[0].solves)
    fp_state = moe.load_pretrained(fp_export, device="cpu").state_dict()
    served = moe.load_pretrained(tmp_path / "q", device="cpu")  # quantized weights + B A, as the job applied them
    served_state = served.state_dict()
    config = served.config
    model = moe.load_pretrained(fp_export, device="cpu")
    checked = 0
    for layer_idx in range(config.num_layers):
        for stage in (1, 2):
            targets = stage_targets(config, layer_idx, stage)
            if not targets:
                continue
            expected = naive_hessians(model, ids, layer_idx, stage, ks, agq=True)
            for target in targets:
                weight, hessian, *_, eora_rank, _device = next(solves)
                want = expected[target.hessian]
                assert torch.allclose(hessian.matrix, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), target.name
                assert eora_rank == (0 if target.hessian == "router" else 2)
                checked += 1
            with torch.no_grad():  # this stage is done: its quantized (and corrected) weights go in
                for target in targets:
                    model.state_dict()[target.param].copy_(served_state[target.param])
    assert next(solves, None) is None and checked == len(clusters[0].solves)
    assert not torch.equal(fp_state["blocks.2.ffn.experts.w1"], served_state["blocks.2.ffn.experts.w1"])


def test_ebss_calibration_at_several_ks_reports_their_mean_sigma(fp_export, tmp_path, clusters):
    from launch.quantize.job import calibration_runs, calibration_sigma, make_calibration

    model = moe.load_pretrained(fp_export, device="cpu")
    opts = options(calib="ebss", experts=[1, 2], num_sequences=2, seq_len=8)
    ids = make_calibration(model, {}, opts, InProcessCluster())
    assert ids.shape == (2, 8)
    runs = calibration_runs(model, opts)
    assert runs == [[1, 1], [2, 2]]
    sigmas = []
    for k in (1, 2):
        moe.set_active_experts(model, k)
        sigmas.append(calibration_sigma(model, ids, "cpu"))
    assert sigmas[0] != sigmas[1]
    assert calibration_sigma(model, ids, "cpu", runs) == pytest.approx(sum(sigmas) / 2, rel=1e-12)
    assert [layer.active_experts for _, layer in moe.moe_layers(model)] == [2, 2]  # restored


# ------------------------------------------------------------------------------------------------
# EoRA end to end
# ------------------------------------------------------------------------------------------------


def folded_state(path: Path) -> dict:
    """The weights an export serves, rebuilt from its files by hand: codes unpacked, scale * (code
    - zero), plus eora_b @ eora_a, in each parameter's own layout."""
    meta = json.loads((path / "config.json").read_text())["quantization"]
    spec = QuantSpec.from_dict(meta["spec"])
    tensors = tensors_of(path)
    weights = {}
    for param, entry in meta["tensors"].items():
        codes = unpack_codes(tensors[f"{param}.qweight"], spec.bits, entry["in_features"])
        scales, zeros = tensors[f"{param}.scales"], tensors[f"{param}.zeros"].float()
        if entry["experts"]:
            weight = torch.stack([QuantizedWeight(c, s, z, spec).dequantize() for c, s, z in zip(codes, scales, zeros)])
        else:
            weight = QuantizedWeight(codes, scales, zeros, spec).dequantize()
        if "eora_rank" in entry:
            weight = weight + tensors[f"{param}.eora_b"].float() @ tensors[f"{param}.eora_a"].float()
        weights[param] = weight.transpose(1, 2) if entry["experts"] else weight
    return weights


@torch.no_grad()
def test_eora_export_loads_corrected_and_is_closer_to_full_precision(fp_export, tmp_path, clusters):
    """3 bits, GPTQ + AGQ with and without EoRA r4: the export stores A and B beside every packed
    linear but the router; loading gives the dequantized weight plus B A; on held-out batches the
    corrected model's logits are closer to the full-precision model's."""
    ids = calibration_ids(16)
    for name, rank in (("plain", 0), ("eora", 4)):
        quantize_model(str(fp_export), str(tmp_path / name), options(bits=3, eora=rank), calibration=ids,
                       progress=False)
    meta = json.loads((tmp_path / "eora" / "config.json").read_text())["quantization"]
    assert meta["label"] == "GPTQ + AGQ + EoRA r4" and meta["eora_rank"] == 4
    with_rank = {p for p, entry in meta["tensors"].items() if entry.get("eora_rank") == 4}
    assert with_rank == {p for p in meta["tensors"] if not p.endswith("router.weight")}
    tensors = tensors_of(tmp_path / "eora")
    assert tensors["blocks.2.ffn.experts.w2.eora_a"].shape == (4, 4, 16)  # [E, r, in]: w2[e].T is [d, f]
    assert tensors["blocks.2.ffn.experts.w2.eora_b"].shape == (4, 32, 4)  # [E, out, r]

    loaded = moe.load_pretrained(tmp_path / "eora", device="cpu")
    rebuilt = moe.load_pretrained(fp_export, device="cpu")
    rebuilt.load_state_dict({**rebuilt.state_dict(), **folded_state(tmp_path / "eora")})
    moe.set_active_experts(rebuilt, 2)
    held_out = calibration_ids(8, seed=7)
    assert torch.equal(loaded(held_out), rebuilt(held_out))

    fp = moe.load_pretrained(fp_export, device="cpu")
    moe.set_active_experts(fp, 2)
    plain = moe.load_pretrained(tmp_path / "plain", device="cpu")
    reference = fp(held_out)
    error_plain = (plain(held_out) - reference).square().mean()
    error_eora = (loaded(held_out) - reference).square().mean()
    assert error_eora < error_plain, (float(error_eora), float(error_plain))
    sizes = [sum(f.stat().st_size for f in (tmp_path / name).iterdir()) for name in ("plain", "eora")]
    assert sizes[1] > sizes[0]  # the factors are stored


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def test_parse_experts():
    assert parse_experts(None) is None
    assert parse_experts("4") == 4
    assert parse_experts("2,4,8") == [2, 4, 8]
    assert parse_experts(" 8, 2 ") == [8, 2]
    for text, problem in (("", "an empty list"), (",", "an empty list"), ("2,2", "k=2 is listed twice"),
                          ("0", "k=0 is not an integer >= 1"), ("2,-1", "k=-1 is not an integer >= 1"),
                          ("two", "comma-separated list"), ("2.5", "comma-separated list")):
        with pytest.raises(UserError, match=problem):
            parse_experts(text)


def test_the_command_takes_several_ks_and_a_rank_and_rejects_bad_ones(fp_export, tmp_path, clusters, capsys):
    out = tmp_path / "q"
    common = ["quantize", "--model", str(fp_export), "--num-sequences", "4", "--seq-len", "16", "--shards", "1"]
    bad = [(["--experts", "2,2"], "--experts 2,2 is invalid: k=2 is listed twice"),
           (["--experts", ""], "--experts '' is invalid"),
           (["--experts", "1,5"], "--experts 1,5 is invalid: k=5 is outside 1..4 (the model's number of experts)"),
           (["--experts", "0"], "k=0 is not an integer >= 1"),
           (["--eora", "-1"], "--eora -1 is invalid"),
           (["--eora", "17"], "--eora 17 is invalid: the rank must be an integer in 1..16"),
           (["--eora", "2", "--method", "rtn"], "--eora needs"),
           (["--compare", "--eora", "17"], "--eora 17 is invalid")]
    for extra, message in bad:
        assert main([*common, "--out", str(tmp_path / "bad"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not clusters  # each was refused before any work
    assert main([*common, "--out", str(out), "--experts", "3,1", "--eora", "3", "--calib", "ebss", "--agq"]) == 0
    printed = capsys.readouterr().out
    assert "GPTQ + EBSS + AGQ + EoRA r3 W4 at k=3,1 in" in printed and " MB" in printed
    model = moe.load_pretrained(out, device="cpu")
    assert model.quantization["calibration_ks"] == [[2, 3], [1, 1]]  # a k above a layer's E is its E
    assert model.quantization["options"]["experts"] == [3, 1] and model.quantization["eora_rank"] == 3
    assert [layer.active_experts for _, layer in moe.moe_layers(model)] == [2, 3]  # the first k is the default
    assert len(clusters) == 1 and clusters[0].solves


def test_compare_with_several_ks_has_eora_rows_per_k(fp_export, tmp_path, clusters):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(300)))
    report = compare(str(fp_export), str(tmp_path / "report"), [3], options(experts=[1, 2], shards=1), data=str(corpus),
                     eval_tokens=64, eval_batch_size=2, progress=False, eora_rank=2)
    rows = report["rows"]
    methods = ["FP", "RTN", "GPTQ", "GPTQ + EBSS", "GPTQ + AGQ", "GPTQ + EBSS + AGQ", "GPTQ + EBSS + AGQ + EoRA r2"]
    assert [(row["method"], row["k"]) for row in rows] == [(m, k) for m in methods for k in (1, 2)]
    by = {(row["method"], row["k"]): row for row in rows}
    for (method, k), row in by.items():
        assert row["ppl_vs_fp"] == pytest.approx(row["perplexity"] / by[("FP", k)]["perplexity"])
        if method != "FP":  # the paired difference's mean is the difference of the means, same windows
            assert row["delta_vs_fp"] == pytest.approx(row["val_loss"] - by[("FP", k)]["val_loss"], abs=1e-9)
            assert row["delta_se"] >= 0
    assert by[("GPTQ + EBSS + AGQ + EoRA r2", 1)]["size_mb"] > by[("GPTQ + EBSS + AGQ", 1)]["size_mb"]
    assert report["calibration_ks"] == [1, 2] and report["eora_rank"] == 2
    table = compare_table(report)
    assert "| bits | method | k | val loss |" in table and "| W3 | GPTQ + EBSS + AGQ + EoRA r2 | 2 |" in table
    assert "k=1,2 (Hessians summed over the ks" in table
    saved = json.loads((tmp_path / "report" / "w3-gptq-ebss-agq-eora2" / "config.json").read_text())
    assert saved["quantization"]["eora_rank"] == 2 and saved["quantization"]["calibration_ks"] == [[1, 1], [2, 2]]


def test_a_finished_block_keeps_its_eora_factors_for_resuming(tmp_path):
    """``OUT/.partial``: a block saved with EoRA corrections loads with them (a resumed job applies
    the same corrected weights as the undisturbed one)."""
    from launch.quantize.job import Progress
    from moe.quant import Hessian, eora, rtn

    spec = QuantSpec(bits=3)
    x = torch.randn(64, 8)
    solved = {"lin": rtn(torch.randn(6, 8), spec), "exp": [rtn(torch.randn(5, 8), spec) for _ in range(2)]}
    for part in [solved["lin"], *solved["exp"]]:
        part.eora = eora(part.dequantize() + 0.1 * torch.randn(part.shape), part.dequantize(), Hessian(8).add(x), 2)
    job = Progress(tmp_path, {"bits": 3}, overwrite=False)
    job.save_block(0, solved, spec)
    loaded = job.load_block(0)
    assert torch.equal(loaded["lin"].effective(), solved["lin"].effective())
    for got, want in zip(loaded["exp"], solved["exp"]):
        assert torch.equal(got.effective(), want.effective()) and got.eora.rank == 2
    assert not torch.equal(solved["lin"].effective(), solved["lin"].dequantize())
