"""The cost model of ``moe plan``: memory per device and step time of one parallel layout.

Model facts (:class:`ModelFacts`) come from the model the run config builds: parameter counts
(``MoETransformer.num_parameters``, the experts' stacked weights), training FLOPs per token
(``launch.train.train_flops_per_token`` at the layers' k), the all-to-all volume
(``launch.bench.ep.all_to_all_bytes_per_step``) and the number of tensor ops one micro-batch
dispatches, counted by running a width-shrunk copy of the model (same layers, experts, k, heads,
vocabulary; hidden 2 per head, expert width 2) forward and backward on the CPU.

Memory per device (DeepSpeed semantics; N the group a tensor is sharded over: the data-parallel
world W for dense parameters, the expert-data-parallel group W/EP for expert parameters, each rank
holding E/EP experts of every MoE layer)::

    bytes per parameter    bf16 mixed precision: weights 2, gradients 2, fp32 master 4, Adam moments 8
                           fp32: weights 4, gradients 4, master 4 under ZeRO 1-3 (DeepSpeed's fp32
                           partition) and none under ZeRO-0 (the plain optimizer), moments 8
    ZeRO-0                 weights + gradients + master + moments
    ZeRO-1                 weights + gradients + (master + moments) / N
    ZeRO-2                 weights + (gradients + master + moments) / N
    ZeRO-3                 (weights + gradients + master + moments) / N, plus the largest block's
                           weights gathered (twice: the prefetch)
    ZeRO-1/2 buckets       reduce_bucket_size elements (DeepSpeed's default 5e8, or the config's) of
                           gradient dtype, twice with overlap_comm (DeepSpeed allocates them whole)
    activations            one micro-batch's saved tensors, T = micro_batch * seq tokens, per token:
                           attention block  9d (x, its norm, q k v, rotated q k, attention output and
                                            its reshaped copy) + H fp32 (SDPA log-sum-exp)
                           MoE FFN          3d + 2kd + 3kf (2kf for gelu/relu: x, its norm, gathered
                                            rows, h1, h3, the activation, expert outputs, the layer
                                            output) + shared experts' 3 * width, and 2E + 3k fp32
                                            (router logits and scores, gate weights and indices)
                           dense FFN        3d + 3f
                           head             2d + V, and V fp32 (the loss's log-softmax)
    all-to-all buffers     EP > 1: one layer's rows sent and received, 2 k d T
    reserve                ``cluster.memory_reserve_gib`` (CUDA context, fragmentation)

Step time (m micro-batches per optimizer step; nothing overlaps: an upper bound where DeepSpeed's
overlap_comm hides reductions under backward)::

    compute    = FLOPs / (peak * matmul_efficiency)
               + (4 * activation bytes * m + 28 bytes * optimizer-shard parameters) / memory_bandwidth
                 (each saved activation written, read, and its gradient written and read; AdamW
                 reads and writes master, moments and weight, and reads the gradient)
               + (ops per micro-batch * m + ops per optimizer step) * op_overhead
                 (host and device times add: routing reads token counts on the host in every
                 MoE layer, which drains the device's queue)
    all-to-all = bytes / bandwidth + 5 calls per MoE layer and micro-batch * latency
                 (counts, dispatch and combine, and the backward of the last two); bytes off the
                 node and on it travel at once, over the NIC and over NVLink
    all-reduce = ring volume 2 (N-1)/N * bytes over N ranks, per step (ZeRO-0; ZeRO-1 as a
                 reduce-scatter and an all-gather), per micro-batch reduce-scatters (ZeRO-2),
                 per micro-batch gather, gather and reduce-scatter (ZeRO-3); dense gradients over
                 W, expert gradients over W/EP; inter-node bandwidth once a group spans nodes
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

from launch.plan.cluster import Cluster

GIB = float(1 << 30)
ACTIVATION_PASSES = 4
"""Device-memory passes over each saved activation per micro-batch: written (forward), read
(backward), its gradient written and read."""
OPTIMIZER_BYTES_PER_PARAM = 28
"""AdamW's traffic per parameter of the local optimizer shard: fp32 master, two moments read and
written (24), the gradient read and the weight written (2 + 2 in bf16, 4 read + no copy in fp32)."""
A2A_CALLS_PER_LAYER = 5
"""All-to-all calls per MoE layer and micro-batch (parallel/dispatcher.py): counts, dispatch,
combine, and the backward of dispatch and combine."""
DEEPSPEED_BUCKET_ELEMENTS = int(5e8)
"""DeepSpeed's default reduce_bucket_size (deepspeed/runtime/zero/config.py)."""
SUPPORTED_ZERO_STAGES = (0, 1, 2)
"""What ``moe train`` accepts (launch.config); stage 3 is estimated, then rejected."""


@dataclass(frozen=True)
class ModelFacts:
    """What the cost model needs from a run config, read off the model it builds."""

    params: int
    """All parameters."""
    expert_params: int
    """The routed experts' weights (w1, w2, w3 of every MoE layer): sharded by expert parallelism."""
    largest_block_params: int
    """Parameters of the largest transformer block (ZeRO-3 gathers one at a time)."""
    train_flops_per_token: int
    """Forward + backward FLOPs of one token at the layers' k and the sequence length."""
    layer_ks: tuple
    """Active experts of each MoE layer, in order."""
    layer_experts: tuple
    """Experts E of each MoE layer, in order."""
    hidden: int
    seq_len: int
    activation_elements_per_token: int
    """Saved activation elements per token in the training dtype (formula in the module docstring)."""
    activation_fp32_per_token: int
    """Saved fp32 elements per token (router, SDPA statistics, the loss's log-softmax)."""
    ops_per_micro_batch: int
    """Tensor ops one micro-batch dispatches (forward, router losses, backward), counted."""
    ops_per_step: int
    """Tensor ops once per optimizer step (AdamW, the bias update), counted."""

    @property
    def dense_params(self) -> int:
        return self.params - self.expert_params

    @property
    def moe_layers(self) -> int:
        return len(self.layer_ks)


@dataclass(frozen=True)
class Layout:
    """One way to run: W ranks, EP of them share each layer's experts, ZeRO stage, micro-batch."""

    world: int
    ep: int
    zero: int
    micro_batch: int
    grad_accum: int

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense parameters (every rank)."""
        return self.world

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts (expert gradients are reduced among them)."""
        return self.world // self.ep

    def label(self) -> str:
        return f"DP={self.dp} EP={self.ep} ZeRO-{self.zero} mb={self.micro_batch} accum={self.grad_accum}"


@dataclass
class Estimate:
    """Memory and time of one layout; ``reason`` is set when it cannot run."""

    layout: Layout
    memory: dict = field(default_factory=dict)
    """Bytes per device by part: weights, gradients, optimizer, buckets, activations, a2a_buffers, reserve."""
    compute_s: float = 0.0
    a2a_s: float = 0.0
    allreduce_s: float = 0.0
    tokens_per_step: int = 0
    model_flops_per_s: float = 0.0
    """Model FLOP/s of one device at this step time (MFU's numerator)."""
    reason: Optional[str] = None
    """Why the layout is rejected: "out of memory", "EP does not divide ...", ...; None when it runs."""
    detail: str = ""

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def step_s(self) -> float:
        return self.compute_s + self.a2a_s + self.allreduce_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self.layout), "memory_gib": self.memory_bytes / GIB,
                "memory_parts_gib": {k: v / GIB for k, v in self.memory.items()}, "compute_ms": 1e3 * self.compute_s,
                "a2a_ms": 1e3 * self.a2a_s, "allreduce_ms": 1e3 * self.allreduce_s, "step_ms": 1e3 * self.step_s,
                "tokens_per_s": self.tokens_per_s, "model_flops_per_s": self.model_flops_per_s,
                "reason": self.reason, "detail": self.detail}


# ----------------------------------------------------------------------------- model facts


def activation_elements(config, ks: Sequence[int]) -> tuple[int, int]:
    """(training-dtype elements, fp32 elements) saved per token for backward: the module docstring's formula."""
    d, heads, vocab = config.hidden_size, config.num_heads, config.vocab_size
    moe_index = 0
    low, fp32 = 2 * d + vocab, vocab  # head: final norm input and output, logits; the loss's log-softmax
    for layer in range(config.num_layers):
        low += 9 * d
        fp32 += heads
        if config.is_moe_layer(layer):
            block = config.moe.for_block(moe_index)
            k, f = ks[moe_index], block.ffn_hidden_size
            low += 3 * d + 2 * k * d + (3 if block.activation == "swiglu" else 2) * k * f + 3 * block.shared_width
            fp32 += 2 * block.num_experts + 3 * k
            moe_index += 1
        else:
            low += 3 * d + 3 * (config.dense_ffn_hidden_size or config.moe.ffn_hidden_size * config.moe.top_k)
    return low, fp32


def count_ops(config, ks: Sequence[int], seq: int = 8, batch: int = 2) -> tuple[int, int]:
    """(ops per micro-batch, ops per optimizer step) a training step dispatches, counted with a
    ``TorchDispatchMode`` on a width-shrunk copy of the model on the CPU. The experts run the
    fixed-shape "gather" backend, whose op count does not grow with E, as the fused GPU kernels'."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    moe_cfg = config.moe
    small_moe = dataclasses.replace(
        moe_cfg, hidden_size=2 * config.num_heads, ffn_hidden_size=2, expert_backend="gather",
        shared_ffn_hidden_size=None if moe_cfg.shared_ffn_hidden_size is None else 2)
    small = dataclasses.replace(config, moe=small_moe, max_seq_len=seq,
                                dense_ffn_hidden_size=None if config.dense_ffn_hidden_size is None else 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        return _count(config, small, ks, seq, batch, Counter)
    finally:
        torch.set_num_threads(threads)


def _count(config, small, ks, seq, batch, Counter) -> tuple[int, int]:
    import torch

    from moe import MoETransformer, collect_aux_losses, set_active_experts, update_expert_biases

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MoETransformer(small)
        set_active_experts(model, list(ks))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
        for _ in range(2):  # the first step creates the optimizer state: count the second
            micro, step = Counter(), Counter()
            with micro:
                _, loss = model(tokens[:, :-1], labels=tokens[:, 1:])
                aux = collect_aux_losses(model)
                (loss if aux is None else loss + aux).backward()
            with step:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update_expert_biases(model)
    return micro.ops, step.ops


def model_facts(run_config, k: Optional[int] = None, step: Optional[int] = None, seq_len: Optional[int] = None,
                count: bool = True) -> ModelFacts:
    """Facts of ``run_config``'s model at k (default: each layer's k at optimizer step ``step`` of its
    schedule, default the middle of ``train.steps``) and sequence length (default ``train.seq_len``)."""
    import torch

    from launch.train.job import train_flops_per_token
    from moe import MoETransformer, advance_k_schedule, moe_layers, set_active_experts

    seq = seq_len or run_config.train.seq_len
    with torch.device("meta"):  # shapes only
        model = MoETransformer(run_config.model)
    if k is not None:
        set_active_experts(model, k)
    else:
        advance_k_schedule(model, run_config.train.steps // 2 if step is None else step)
    layers = [layer for _, layer in moe_layers(model)]
    ks = tuple(layer.active_experts for layer in layers)
    expert_params = sum(w.numel() for layer in layers for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3)
                        if w is not None)
    low, fp32 = activation_elements(run_config.model, ks)
    ops_micro, ops_step = count_ops(run_config.model, ks) if count else (0, 0)
    return ModelFacts(
        params=model.num_parameters(), expert_params=expert_params,
        largest_block_params=max(sum(p.numel() for p in block.parameters()) for block in model.blocks),
        train_flops_per_token=train_flops_per_token(model, seq), layer_ks=ks,
        layer_experts=tuple(layer.num_experts for layer in layers), hidden=run_config.model.hidden_size, seq_len=seq,
        activation_elements_per_token=low, activation_fp32_per_token=fp32, ops_per_micro_batch=ops_micro,
        ops_per_step=ops_step,
    )


# ----------------------------------------------------------------------------- memory


def state_bytes_per_param(bf16: bool, zero: int) -> dict:
    """Bytes per parameter of weights, gradients, fp32 master and Adam moments (before sharding)."""
    if bf16:
        return {"weights": 2, "gradients": 2, "master": 4, "moments": 8}
    return {"weights": 4, "gradients": 4, "master": 4 if zero >= 1 else 0, "moments": 8}


def sharded_state_bytes(params: float, group: int, bf16: bool, zero: int) -> dict:
    """Bytes per rank of ``params`` parameters whose ZeRO group has ``group`` ranks."""
    per = state_bytes_per_param(bf16, zero)
    shard = {"weights": zero >= 3, "gradients": zero >= 2, "master": zero >= 1, "moments": zero >= 1}
    return {part: params * b / (group if shard[part] else 1) for part, b in per.items()}


def memory_per_device(facts: ModelFacts, layout: Layout, cluster: Cluster, zero_section: Optional[dict] = None) -> dict:
    """Bytes per device by part (see the module docstring)."""
    zero_section = zero_section or {}
    bf16 = cluster.bf16
    low_bytes = 2 if bf16 else 4
    dense = sharded_state_bytes(facts.dense_params, layout.dp, bf16, layout.zero)
    expert = sharded_state_bytes(facts.expert_params / layout.ep, layout.expert_dp, bf16, layout.zero)
    parts = {
        "weights": dense["weights"] + expert["weights"],
        "gradients": dense["gradients"] + expert["gradients"],
        "optimizer": dense["master"] + dense["moments"] + expert["master"] + expert["moments"],
    }
    if layout.zero in (1, 2) and zero_section.get("contiguous_gradients", True):
        bucket = int(zero_section.get("reduce_bucket_size", DEEPSPEED_BUCKET_ELEMENTS))
        parts["buckets"] = bucket * low_bytes * (2 if zero_section.get("overlap_comm", False) else 1)
    elif layout.zero == 3:
        parts["buckets"] = 2 * facts.largest_block_params * low_bytes
    tokens = layout.micro_batch * facts.seq_len
    parts["activations"] = tokens * (facts.activation_elements_per_token * low_bytes + facts.activation_fp32_per_token * 4)
    if layout.ep > 1:
        parts["a2a_buffers"] = 2 * max(facts.layer_ks) * facts.hidden * tokens * low_bytes
    parts["reserve"] = cluster.memory_reserve_gib * GIB
    return parts


# ----------------------------------------------------------------------------- communication


def _spans_nodes(ranks: Sequence[int], gpus_per_node: int) -> bool:
    return len({rank // gpus_per_node for rank in ranks}) > 1


def ring_seconds(nbytes: float, ranks: Sequence[int], cluster: Cluster, phases: int) -> float:
    """``phases`` ring passes (a reduce-scatter or an all-gather each; an all-reduce is two) of
    ``nbytes`` over ``ranks``: (N-1)/N of the bytes per pass, N-1 latency steps per pass."""
    n = len(ranks)
    if n <= 1 or nbytes <= 0:
        return 0.0
    bandwidth = (cluster.inter_node_gbps if _spans_nodes(ranks, cluster.gpus_per_node) else cluster.intra_node_gbps) * 1e9
    return phases * ((n - 1) / n * nbytes / bandwidth + (n - 1) * cluster.collective_latency_us * 1e-6)


def all_to_all_seconds(facts: ModelFacts, layout: Layout, cluster: Cluster) -> float:
    """Time of one optimizer step's all-to-all exchanges on one rank (balanced routing)."""
    from launch.bench.ep import all_to_all_bytes_per_step

    if layout.ep <= 1:
        return 0.0
    dtype_bytes = 2 if cluster.bf16 else 4
    tokens = layout.micro_batch * facts.seq_len
    nbytes = layout.grad_accum * sum(all_to_all_bytes_per_step(1, tokens, k, facts.hidden, dtype_bytes, layout.ep)
                                     for k in facts.layer_ks)
    group = range(layout.ep)  # expert-parallel groups are EP consecutive ranks (parallel/groups.py)
    g = cluster.gpus_per_node
    peers_on_node = sum(sum(1 for q in group if q != r and q // g == r // g) for r in group) / layout.ep
    near = peers_on_node / (layout.ep - 1)  # share of a rank's traffic that stays on its node
    transfer = max(near * nbytes / (cluster.intra_node_gbps * 1e9), (1 - near) * nbytes / (cluster.inter_node_gbps * 1e9))
    calls = A2A_CALLS_PER_LAYER * facts.moe_layers * layout.grad_accum
    return transfer + calls * cluster.collective_latency_us * 1e-6


def reduction_seconds(facts: ModelFacts, layout: Layout, cluster: Cluster) -> float:
    """Gradient reduction (and ZeRO's parameter gathers) of one optimizer step."""
    low_bytes = 2 if cluster.bf16 else 4
    m = layout.grad_accum
    phases_per_step = {0: 2, 1: 2, 2: 1, 3: 0}[layout.zero]  # all-reduce / reduce-scatter + all-gather / all-gather
    phases_per_micro = {0: 0, 1: 0, 2: 1, 3: 3}[layout.zero]
    dense_group = range(layout.world)
    expert_group = range(0, layout.world, layout.ep)  # ranks holding the same experts (parallel/groups.py)
    total = 0.0
    for params, group in ((facts.dense_params, dense_group), (facts.expert_params / layout.ep, expert_group)):
        nbytes = params * low_bytes
        total += ring_seconds(nbytes, group, cluster, phases_per_step + m * phases_per_micro)
    return total


# ----------------------------------------------------------------------------- one layout


def estimate(facts: ModelFacts, layout: Layout, cluster: Cluster, zero_section: Optional[dict] = None) -> Estimate:
    """Memory and step time of ``layout``; ``reason`` says why it cannot run (the estimate is still filled in)."""
    result = Estimate(layout)
    bf16 = cluster.bf16
    low_bytes = 2 if bf16 else 4
    tokens_micro = layout.micro_batch * facts.seq_len
    m = layout.grad_accum
    result.tokens_per_step = layout.world * tokens_micro * m
    result.memory = memory_per_device(facts, layout, cluster, zero_section)

    flops = facts.train_flops_per_token * tokens_micro * m  # per rank: balanced routing
    matmul_s = flops / (cluster.peak_flops * cluster.matmul_efficiency)
    activation_bytes = tokens_micro * (facts.activation_elements_per_token * low_bytes + facts.activation_fp32_per_token * 4)
    shard = (facts.dense_params / (layout.dp if layout.zero >= 1 else 1)
             + facts.expert_params / layout.ep / (layout.expert_dp if layout.zero >= 1 else 1))
    memory_s = (ACTIVATION_PASSES * activation_bytes * m + OPTIMIZER_BYTES_PER_PARAM * shard) / (cluster.memory_gbps * 1e9)
    host_s = (facts.ops_per_micro_batch * m + facts.ops_per_step) * cluster.op_overhead_us * 1e-6
    result.compute_s = matmul_s + memory_s + host_s
    result.a2a_s = all_to_all_seconds(facts, layout, cluster)
    result.allreduce_s = reduction_seconds(facts, layout, cluster)
    result.model_flops_per_s = flops / result.step_s
    result.detail = f"matmul {1e3 * matmul_s:.1f} ms, memory-bound {1e3 * memory_s:.1f} ms, host {1e3 * host_s:.1f} ms"
    return result


# ----------------------------------------------------------------------------- the search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(facts: ModelFacts, cluster: Cluster, global_batch_tokens: int, micro_batches: Sequence[int],
           zero_stages: Sequence[int] = (0, 1, 2, 3), zero_section: Optional[dict] = None) -> list[Estimate]:
    """Every (EP, ZeRO stage, micro-batch) on the cluster's world, estimated; rejected ones carry a reason.

    EP candidates: the divisors of the world size and of each layer's E (those that fail one of
    the two are rejected by name)."""
    world = cluster.world_size
    experts = sorted(set(facts.layer_experts))
    eps = sorted({d for d in _divisors(world)} | {d for e in experts for d in _divisors(e) if d <= world})
    results = []
    for ep, zero, mb in itertools.product(eps, zero_stages, sorted(set(micro_batches))):
        per_step = world * mb * facts.seq_len
        accum = max(1, global_batch_tokens // per_step)
        result = estimate(facts, Layout(world, ep, zero, mb, accum), cluster, zero_section)
        capacity = cluster.memory_gib * GIB
        if world % ep:
            result.reason = f"EP does not divide the world size ({world})"
        elif any(e % ep for e in experts):
            listed = experts[0] if len(experts) == 1 else experts
            result.reason = f"EP does not divide num_experts ({listed})"
        elif global_batch_tokens % per_step:
            result.reason = f"global batch ({global_batch_tokens:,} tokens) is not a multiple of world x micro-batch x seq"
        elif result.memory_bytes > capacity:
            result.reason = "out of memory"
            result.detail = (f"needs {result.memory_bytes / GIB:.1f} GiB of {cluster.memory_gib:g} "
                             f"(+{(result.memory_bytes - capacity) / GIB:.1f})")
        elif zero not in SUPPORTED_ZERO_STAGES:
            result.reason = "ZeRO-3: moe train accepts stages 0, 1, 2 (launch.config)"
        results.append(result)
    return results


def rank(results: Sequence[Estimate]) -> list[Estimate]:
    """Feasible layouts, fastest first (less memory breaks ties)."""
    return sorted((r for r in results if r.reason is None), key=lambda r: (-r.tokens_per_s, r.memory_bytes))
