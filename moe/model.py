"""A small decoder-only language model whose feed-forward blocks are MoE layers.

token embedding -> L x [RMSNorm -> causal self-attention (rotary, SDPA) -> residual,
                        RMSNorm -> MoE FFN (or dense SwiGLU FFN) -> residual]
-> RMSNorm -> LM head (optionally tied to the embedding)

Shapes: B batch, S sequence, d hidden, H heads, D = d / H head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig
from moe.errors import UserError
from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.validation import check_bool, check_int, check_number, fail, from_dict

_OWNER = "ModelConfig"


@dataclass
class ModelConfig:
    """The language model; ``moe`` configures every MoE feed-forward layer."""

    vocab_size: int = 256
    """Vocabulary size V (256: the byte-level default)."""

    num_layers: int = 4
    """Transformer blocks L."""

    num_heads: int = 4
    """Attention heads H; must divide ``moe.hidden_size``."""

    max_seq_len: int = 256
    """Longest sequence the rotary table covers."""

    moe_every: int = 1
    """Every n-th block (counting from the first) has an MoE FFN; the others a dense SwiGLU FFN."""

    dense_ffn_hidden_size: Optional[int] = None
    """Hidden width of the dense FFN blocks (default: moe.ffn_hidden_size * moe.top_k)."""

    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""

    rope_theta: float = 10000.0
    """Rotary base frequency."""

    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation of embeddings and projections."""

    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layer configuration (hidden_size is the model width d)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, Mapping):
            self.moe = MoEConfig.from_dict(self.moe)
        for name in ("vocab_size", "num_layers", "num_heads", "max_seq_len", "moe_every"):
            check_int(_OWNER, name, getattr(self, name))
        if self.moe.hidden_size % self.num_heads:
            fail(_OWNER, "num_heads", self.num_heads, f"it must divide moe.hidden_size ({self.moe.hidden_size})")
        if (self.moe.hidden_size // self.num_heads) % 2:
            fail(_OWNER, "num_heads", self.num_heads, "the head dim must be even for rotary")
        if self.moe.per_block and len(self.moe.num_experts) != self.num_moe_layers:
            fail(_OWNER, "moe.num_experts", self.moe.num_experts,
                 f"expected one count per MoE block: {self.num_moe_layers} (num_layers={self.num_layers}, "
                 f"moe_every={self.moe_every})")
        if self.dense_ffn_hidden_size is not None:
            check_int(_OWNER, "dense_ffn_hidden_size", self.dense_ffn_hidden_size)
        for name in ("rope_theta", "norm_eps", "init_std"):
            check_number(_OWNER, name, getattr(self, name), strict=True)
        check_bool(_OWNER, "tie_embeddings", self.tie_embeddings)

    @property
    def hidden_size(self) -> int:
        return self.moe.hidden_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def moe_config(self, layer_idx: int) -> MoEConfig:
        """The MoE config of block ``layer_idx`` (an MoE block): its own E under a per-block list."""
        return self.moe.for_block(sum(self.is_moe_layer(i) for i in range(layer_idx)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping (with a nested ``moe`` mapping); unknown keys raise ``ValueError``."""
        return from_dict(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_table(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """``[S, D/2, 2]``: cos and sin of position * theta^(-2i/D)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # [S, D/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of ``x [B, H, S, D]`` by the angles of ``table [S, D/2, 2]``,
    in fp32: ``(x0 cos - x1 sin, x0 sin + x1 cos)``.

    Eagerly, each pair is the complex number x0 + i x1 times cos + i sin: three kernels (upcast,
    complex product, downcast) instead of one per term. Under ``torch.compile`` the same products
    are written in real arithmetic, which Inductor fuses into one kernel (it generates no code for
    complex tensors). Both give the same bits."""
    table = table.float()
    if torch.compiler.is_compiling():
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, H, S, D/2, 2]
        cos, sin = table[..., 0], table[..., 1]
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    else:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, H, S, D/2]
        rotated = torch.view_as_real(pairs * torch.view_as_complex(table.contiguous()))  # [B, H, S, D/2, 2]
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache=None) -> torch.Tensor:
        """``cache``: a :class:`LayerCache` or a :class:`moe.decode.StaticLayerCache` holding the
        earlier positions; ``x`` continues them and the cache takes its keys and values."""
        batch, seq, d = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            table = rotary[:seq]
            q, k = apply_rotary(q, table), apply_rotary(k, table)  # [B, H, S, D]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            table = cache.rotary(rotary, seq)
            y = cache.attend(apply_rotary(q, table), apply_rotary(k, table), v)
        return self.out(y.transpose(1, 2).reshape(batch, seq, d))


class LayerCache:
    """Keys and values of one attention layer for the positions seen so far, ``[B, H, S, D]``,
    growing by concatenation (any length, a new shape every step; see :mod:`moe.decode` for the
    preallocated one that CUDA graphs and ``torch.compile`` need)."""

    def __init__(self):
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def rotary(self, table: torch.Tensor, seq: int) -> torch.Tensor:
        """The rotary angles of the ``seq`` positions that follow the cached ones."""
        return table[self.length : self.length + seq]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k``, ``v`` ``[B, H, S, D]`` after the cached positions; attention of ``q`` to every
        position up to its own."""
        start, seq = self.length, q.shape[2]
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # new queries at positions start.. attend to every cached key up to their own position
        allowed = torch.arange(start + seq, device=q.device) <= torch.arange(start, start + seq, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=allowed)


class KVCache:
    """One :class:`LayerCache` per block; pass the same object to successive forwards to decode."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve(self, seq: int, max_seq_len: int) -> None:
        """Check that ``seq`` more positions fit (a :class:`UserError` if not)."""
        if self.length + seq > max_seq_len:
            raise UserError(f"sequence length {self.length + seq} exceeds max_seq_len {max_seq_len}")

    def advance(self, seq: int) -> None:
        """Called after a forward over ``seq`` positions (the layer caches already grew)."""


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        if config.is_moe_layer(layer_idx):
            self.ffn = MoELayer(config.moe_config(layer_idx), layer_idx=layer_idx)
        else:
            ffn = config.dense_ffn_hidden_size or config.moe.ffn_hidden_size * config.moe.top_k
            self.ffn = DenseFFN(d, ffn)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, cache)
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """``logits = model(input_ids)``; ``model(input_ids, labels)`` also returns the mean
    next-token cross-entropy (labels are the targets of each position; -100 is ignored)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.register_buffer(
            "rotary", rotary_table(d // config.num_heads, config.max_seq_len, config.rope_theta), persistent=False
        )
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _apply(self, fn, recurse=True):
        # The rotary angles stay fp32 through model.to(torch.bfloat16)/.half(), as the router does:
        # positions far into the sequence need more than bf16's 8 bits of angle.
        rotary = self.rotary
        super()._apply(fn, recurse)
        if rotary.dtype == torch.float32 and self.rotary.dtype != torch.float32:
            self.rotary = rotary.to(device=self.rotary.device)
        return self

    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # Scale the projections that write into the residual stream by depth (GPT-2 style).
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            if isinstance(block.ffn, DenseFFN):
                nn.init.normal_(block.ffn.w2.weight, mean=0.0, std=residual_std)
            else:
                experts = block.ffn.experts
                for weight in (experts.w1, experts.w3):
                    if weight is not None:
                        nn.init.normal_(weight, mean=0.0, std=std)
                nn.init.normal_(experts.w2, mean=0.0, std=residual_std)
                if block.ffn.shared_mlp is not None:
                    nn.init.normal_(block.ffn.shared_mlp.w2.weight, mean=0.0, std=residual_std)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, cache=None):
        """``cache``: a :class:`KVCache` (or :class:`moe.decode.StaticKVCache`) holding the earlier
        positions; ``input_ids`` continue them and the cache is extended (decoding one token at a
        time costs one position, not all)."""
        seq = input_ids.shape[-1]
        if cache is None:
            if seq > self.config.max_seq_len:
                raise UserError(f"sequence length {seq} exceeds max_seq_len {self.config.max_seq_len}")
        else:
            cache.reserve(seq, self.config.max_seq_len)
        x = self.embed(input_ids)  # [B, S, d]
        for i, block in enumerate(self.blocks):
            x = block(x, self.rotary, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(seq)
        logits = self.lm_head(self.norm(x))  # [B, S, V]
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        active_experts: Optional[Union[int, Sequence[int]]] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        static_cache: bool = True,
        cuda_graph: Optional[bool] = None,
    ) -> torch.Tensor:
        """``input_ids [B, S]`` followed by ``max_new_tokens`` sampled tokens, ``[B, S + n]``.

        ``active_experts``: run every MoE layer at this k (an int, or one per MoE layer) for this
        call only; the model's own k is restored afterwards. ``temperature`` 0 is greedy; ``top_k``
        samples among the k most likely tokens. With ``use_cache`` the prompt is encoded once and
        each new token costs one position: by default in a preallocated cache with fixed shapes
        (:class:`moe.decode.StaticDecoder`; each step a CUDA graph on a GPU unless ``cuda_graph``
        is False), with ``static_cache=False`` in a growing :class:`KVCache`. Without ``use_cache``
        every step re-encodes everything (the reference the caches are tested against).
        """
        from moe.decode import StaticDecoder
        from moe.runtime import set_active_experts

        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise UserError(f"generate: input_ids must be [batch, length >= 1], got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 0 or input_ids.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise UserError(
                f"generate: max_new_tokens={max_new_tokens} is invalid: the prompt ({input_ids.shape[1]}) plus the new "
                f"tokens must fit in max_seq_len ({self.config.max_seq_len})"
            )
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise UserError(f"generate: temperature={temperature} must be >= 0 and top_k={top_k} >= 1")
        layers = [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]
        saved = [layer.active_experts for layer in layers]
        was_training = self.training
        self.eval()
        try:
            if active_experts is not None:
                set_active_experts(self, active_experts)
            if use_cache and static_cache and max_new_tokens > 0:
                capacity = input_ids.shape[1] + max_new_tokens - 1
                decoder = StaticDecoder(self, input_ids.shape[0], max(1, capacity), cuda_graph=cuda_graph)
                return decoder.generate(input_ids, max_new_tokens, temperature, top_k, generator)
            cache = KVCache(len(self.blocks)) if use_cache else None
            tokens, step_input = input_ids, input_ids
            for _ in range(max_new_tokens):
                logits = self(step_input if use_cache else tokens, cache=cache)[:, -1].float()  # [B, V]
                next_token = sample_next_token(logits, temperature, top_k, generator)  # [B, 1]
                tokens = torch.cat([tokens, next_token], dim=1)
                step_input = next_token
            return tokens
        finally:
            for layer, k in zip(layers, saved):
                layer.set_active_experts(k)
            self.train(was_training)

    def flops_per_token(self, active_k: Optional[int] = None, context: int = 0) -> int:
        """Forward FLOPs of one token (2 per multiply-add): the attention projections, attention
        over ``context`` positions (scores and values, ``4 * d * context`` per layer), the router,
        ``active_k`` experts per MoE layer (default: each layer's current k), the dense FFNs and the
        LM head. Elementwise work and norms are not counted."""
        cfg = self.config
        d = cfg.hidden_size
        total = 2 * self.lm_head.weight.numel()
        for block in self.blocks:
            total += 2 * (block.attn.qkv.weight.numel() + block.attn.out.weight.numel()) + 4 * d * context
            if isinstance(block.ffn, MoELayer):
                layer_cfg = block.ffn.config  # this block's own (its E may differ from other blocks')
                per_expert = (3 if layer_cfg.activation == "swiglu" else 2) * d * layer_cfg.ffn_hidden_size
                k = block.ffn.active_experts if active_k is None else min(active_k, layer_cfg.num_experts)
                total += 2 * d * layer_cfg.num_experts + 2 * k * per_expert
                if block.ffn.shared_mlp is not None:  # always active
                    total += 2 * sum(p.numel() for p in block.ffn.shared_mlp.parameters())
            else:
                total += 2 * sum(p.numel() for p in block.ffn.parameters())
        return total

    def num_parameters(self, active_k: Optional[int] = None) -> int:
        """All parameters, or those one token uses when each MoE layer runs ``active_k`` experts."""
        total = sum(p.numel() for p in self.parameters())
        if active_k is None:
            return total
        inactive = 0
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                experts = block.ffn.experts
                per_expert = sum(w[0].numel() for w in (experts.w1, experts.w2, experts.w3) if w is not None)
                inactive += max(0, experts.num_experts - active_k) * per_expert
        return total - inactive


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: greedy at temperature 0, else softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
