"""Decoding with fixed shapes: a preallocated KV cache, and the one-token step as a CUDA graph.

The eager decode step of a small model is bound by the host: a few hundred small kernels per token,
each launched from Python. :class:`StaticDecoder` removes that cost the way serving engines do:

- :class:`StaticKVCache` holds every layer's keys and values in buffers allocated once for
  ``capacity`` positions; the current length is a device tensor, so a step reads no host value:
  the new keys are written at ``length + i`` (``index_copy_``), attention reads the whole buffer
  under a mask of the positions filled so far, and the length moves on the device.
- The MoE layers already run without host syncs (routing, the sort by expert and the Triton expert
  kernels take every size from device tensors and launch upper-bound grids), so the whole step has
  fixed shapes: on CUDA it is captured once per set of active-expert counts as a
  :class:`torch.cuda.CUDAGraph` and replayed per token; optionally it is ``torch.compile``d first
  (``fullgraph=True``: no graph break anywhere in the step).
- Sampling stays outside the graph (a handful of kernels), so any sampler and generator work.

A smaller k then costs less per token: the expert kernels read only the weights of the experts
that were chosen, which is what a decode step at batch 1 is bound by.

The decoder holds the model's parameters by address: move or replace them (``.to()``, a new
``load_state_dict`` with ``assign=True``) and build a new decoder. Weights updated in place are
picked up by the next replay.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from moe.errors import UserError

# Eager runs of the step before a capture: the first compiles and autotunes the Triton kernels,
# the others settle the caching allocator, as torch.cuda.graphs' documentation advises.
WARMUP_STEPS = 3


class StaticLayerCache:
    """One layer's view of a :class:`StaticKVCache` (the attention calls ``rotary`` and ``attend``)."""

    def __init__(self, owner: "StaticKVCache", keys: torch.Tensor, values: torch.Tensor):
        self.owner = owner
        self.keys = keys  # [B, H, capacity, D]
        self.values = values

    def rotary(self, table: torch.Tensor, seq: int) -> torch.Tensor:
        """The rotary angles of the ``seq`` positions being written: ``[seq, D/2, 2]``."""
        return table.index_select(0, self.owner.positions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write ``k``, ``v`` ``[B, H, seq, D]`` at their positions; attention of ``q`` to every
        filled position up to its own (the rest of the buffer is masked out)."""
        self.keys.index_copy_(2, self.owner.positions, k.to(self.keys.dtype))
        self.values.index_copy_(2, self.owner.positions, v.to(self.values.dtype))
        return F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=self.owner.mask)


class StaticKVCache:
    """Keys and values of every layer for up to ``capacity`` positions, allocated once.

    ``length`` (int64 ``[1]``, on the cache's device) is the number of positions filled; a forward
    over ``seq`` new positions writes them at ``length .. length + seq - 1`` and then advances it,
    all on the device. ``filled`` mirrors it on the host for eager use (a forward past
    ``capacity`` is then one clear error); under a CUDA graph or ``torch.compile`` the caller
    keeps that account (:class:`StaticDecoder` does).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        if capacity < 1 or batch_size < 1:
            raise UserError(f"StaticKVCache: capacity={capacity} and batch_size={batch_size} must be >= 1")
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        self.key_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.value_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [StaticLayerCache(self, self.key_buffer[i], self.value_buffer[i]) for i in range(num_layers)]
        self.capacity = capacity
        self.batch_size = batch_size
        self.length = torch.zeros(1, dtype=torch.int64, device=device)
        self.filled = 0
        self._offsets = torch.arange(capacity, device=device)  # [capacity]
        self.positions: Optional[torch.Tensor] = None  # [seq]: the positions the current forward writes
        self.mask: Optional[torch.Tensor] = None  # [seq, capacity] bool: what each of them may attend to

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "StaticKVCache":
        """A cache on the model's device, in the dtype of its activations."""
        config = model.config
        weight = model.embed.weight
        return cls(config.num_layers, batch_size, config.num_heads, config.hidden_size // config.num_heads,
                   capacity, weight.dtype, weight.device)

    @property
    def device(self) -> torch.device:
        return self.length.device

    def reset(self) -> None:
        """Forget every position (the buffers are reused; stale entries stay masked)."""
        self.length.zero_()
        self.filled = 0

    def reserve(self, seq: int, max_seq_len: int) -> None:
        """Before a forward over ``seq`` positions: their indices and the attention mask, computed
        once for all layers from the device-side length."""
        if seq > self.capacity or seq > max_seq_len:
            raise UserError(f"a forward over {seq} positions does not fit a static KV cache of {self.capacity} "
                            f"positions (max_seq_len {max_seq_len})")
        if not _tracing_or_capturing():
            if self.filled + seq > min(self.capacity, max_seq_len):
                raise UserError(f"sequence length {self.filled + seq} exceeds the static KV cache's capacity "
                                f"({min(self.capacity, max_seq_len)} positions)")
            self.filled += seq
        self.positions = self.length + self._offsets[:seq]  # [seq]
        self.mask = self._offsets.unsqueeze(0) <= self.positions.unsqueeze(1)  # [seq, capacity]

    def advance(self, seq: int) -> None:
        self.length.add_(seq)


def _tracing_or_capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def active_experts_key(model) -> tuple:
    """The active-expert count of every MoE layer: a captured step is valid for one such tuple."""
    return tuple(getattr(block.ffn, "active_experts", 0) for block in model.blocks)


class StaticDecoder:
    """Prefill and one-token decode steps of ``model`` with fixed shapes.

    ``batch_size`` sequences of at most ``capacity`` positions (prompt plus new tokens).
    ``cuda_graph`` (default: on a CUDA model) replays each step as a CUDA graph, captured per
    combination of active-expert counts on first use; ``compile`` passes the step through
    ``torch.compile(fullgraph=True)`` first (Inductor fuses its elementwise work). The prompt is
    encoded eagerly (one forward, any length).

        decoder = StaticDecoder(model, batch_size=8, capacity=256)
        tokens = decoder.generate(prompt_ids, max_new_tokens=64, temperature=0)

    The logits a step returns live in a buffer the next step overwrites: use them (sample) first.
    """

    def __init__(self, model, batch_size: int, capacity: int, cuda_graph: Optional[bool] = None,
                 compile: bool = False):
        capacity = min(capacity, model.config.max_seq_len)
        self.model = model
        self.cache = StaticKVCache.for_model(model, batch_size, capacity)
        device = self.cache.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise UserError(f"StaticDecoder: cuda_graph=True needs a model on a CUDA device, not {device}")
        self.compile = compile
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the step's input, [B, 1]
        self._step_fn: Callable[[torch.Tensor], torch.Tensor] = self._forward_step
        if compile:
            self._step_fn = torch.compile(self._forward_step, fullgraph=True, dynamic=False)
        self._graphs: dict[tuple, tuple] = {}  # active experts -> (graph, its output buffer)
        self._pool = None

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def position(self) -> int:
        """Positions filled so far (prompt plus decoded tokens)."""
        return self.cache.filled

    def _forward_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, cache=self.cache)[:, -1]  # [B, V]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start over with ``input_ids [B, P]``; the logits of the last position, ``[B, V]``."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size or input_ids.shape[1] < 1:
            raise UserError(f"StaticDecoder.prefill: expected input_ids [{self.batch_size}, P >= 1], "
                            f"got {tuple(input_ids.shape)}")
        with _eval_mode(self.model):
            self.cache.reset()
            return self.model(input_ids.to(self.cache.device), cache=self.cache)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``[B, 1]``); the logits of the new position, ``[B, V]``."""
        if tuple(tokens.shape) != (self.batch_size, 1):
            raise UserError(f"StaticDecoder.step: expected tokens [{self.batch_size}, 1], got {tuple(tokens.shape)}")
        if self.cache.filled + 1 > self.capacity:
            raise UserError(f"StaticDecoder: all {self.capacity} positions of the cache are used; "
                            "build the decoder with a larger capacity")
        self.tokens.copy_(tokens)
        with _eval_mode(self.model):
            if not self.cuda_graph:
                filled = self.cache.filled
                logits = self._step_fn(self.tokens)
                self.cache.filled = filled + 1  # a compiled step does not keep the host account
                return logits
            graph, logits = self._graph()
            graph.replay()
            self.cache.filled += 1
            return logits

    def _graph(self):
        key = active_experts_key(self.model)
        if key not in self._graphs:
            self._graphs[key] = self._capture()
        return self._graphs[key]

    def _capture(self):
        """Warm the step up on a side stream (restoring the cache's length after each run), then
        capture it. Warm-up writes land at the current position, which the real step rewrites."""
        device = self.cache.device
        length = self.cache.length.clone()
        filled = self.cache.filled
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step_fn(self.tokens)
                self.cache.length.copy_(length)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step_fn(self.tokens)
        self.cache.filled = filled
        return graph, logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``input_ids [B, P]`` followed by ``max_new_tokens`` sampled tokens, ``[B, P + n]`` (as
        :meth:`moe.MoETransformer.generate`, at the model's current active experts)."""
        from moe.model import sample_next_token

        if input_ids.shape[-1] + max_new_tokens > self.capacity + 1:
            raise UserError(f"StaticDecoder.generate: a prompt of {input_ids.shape[-1]} and {max_new_tokens} new tokens "
                            f"need {input_ids.shape[-1] + max_new_tokens - 1} cached positions; capacity is {self.capacity}")
        pieces = [input_ids.to(self.cache.device)]
        if max_new_tokens == 0:
            return pieces[0]
        logits = self.prefill(input_ids)
        for i in range(max_new_tokens):
            token = sample_next_token(logits.float(), temperature, top_k, generator)  # [B, 1]
            pieces.append(token)
            if i + 1 < max_new_tokens:
                logits = self.step(token)
        return torch.cat(pieces, dim=1)


class _eval_mode:
    """The model in eval mode for the block (routing statistics are not accumulated), as it was after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        if self.was_training:  # model.eval() walks every module: only when there is something to change
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()
