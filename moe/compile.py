"""``torch.compile`` for the language model, one transformer block at a time.

:func:`compile_blocks` compiles every :class:`~moe.model.Block` in place with
``nn.Module.compile()``: the module keeps its class, its parameters and its place in the model, so
``state_dict`` keys, DeepSpeed checkpoints, exports and the optimizer's parameter groups are the
same as for the eager model. Only the call goes through the compiled function.

Why blocks, not the whole model:

- **One graph, reused.** Every block runs the same code on parameters of the same shapes, and
  Dynamo treats a module's parameters as graph inputs, so the graph traced for the first block
  serves all L of them: compile time does not grow with depth.
- **What stays outside is cheap and awkward to trace.** The embedding, the final norm, the LM head
  and the loss are a handful of large ops, and decoding has its own compiled step (``moe.decode``).
- **Breaks stay local.** Routing has data-dependent sizes where a capacity factor drops tokens, and
  on CPU the C++ expert kernel is wrapped in ``torch.compiler.disable`` (``kernels.expert_mlp``), so
  Dynamo splits the MoE layer there; a break inside one block costs that block's fusion, not the model's.
  On CUDA the expert MLP is the ``slimmoe::expert_mlp`` ``torch.library`` op (or ``F.grouped_mm``)
  and a block traces as one graph without a break (checked on CPU with the Triton interpreter).

k is a Python int on each MoE layer, so Dynamo specialises on it: each distinct k (and training vs
``no_grad`` evaluation) compiles once and is cached. Dynamo's default limit of 8 cached graphs per
function would send a growing k schedule (e.g. 4 -> 16) back to eager after its 8th value, so
:func:`compile_blocks` raises that (process-wide) limit to cover every k from 1 to E twice, with
room to spare for the dense blocks and a changed input shape.
"""

from __future__ import annotations

from torch import nn

from moe.errors import UserError


def _raise_recompile_limit(entries: int) -> None:
    """At least ``entries`` cached graphs per compiled function (and room for them overall)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name torch >= 2.7 uses, then the old one
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), entries))
            break
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * entries)


def compile_blocks(model: nn.Module, **options) -> list[str]:
    """Compile every transformer :class:`~moe.model.Block` of ``model`` in place with
    ``block.compile(**options)`` (the keyword arguments of ``torch.compile``: ``mode``,
    ``backend``, ``dynamic``, ``fullgraph``, ...); returns the compiled blocks' names.

    Call it on the model as built, before an optimizer or the DeepSpeed engine is made; nothing is
    compiled until the first forward. Parameter names and ``state_dict`` keys do not change.
    """
    from moe.layer import MoELayer
    from moe.model import Block

    names = [name for name, module in model.named_modules() if isinstance(module, Block)]
    if not names:
        raise UserError(f"compile_blocks: {type(model).__name__} contains no transformer Block")
    experts = [module.num_experts for module in model.modules() if isinstance(module, MoELayer)]
    _raise_recompile_limit(2 * max(experts, default=1) + 8)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].compile(**options)
    return names
