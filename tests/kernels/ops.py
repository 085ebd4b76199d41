"""A shared check for the routing kernels' torch.library ops."""

from __future__ import annotations

from typing import Callable

import torch


def check_op_and_compile(op, op_args: tuple, loss: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> None:
    """torch.library's own checks of ``op`` on ``op_args`` (schema, fake tensor, autograd
    registration; its AOT harness sums every output into one scalar, which an integer first output
    cannot take), then the AOT path itself: ``torch.compile`` (aot_eager, fullgraph) of
    ``loss(leaf)`` equals eager, the value and ``leaf``'s gradient."""
    torch.library.opcheck(op, op_args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    eager_leaf, compiled_leaf = leaf.detach().clone().requires_grad_(), leaf.detach().clone().requires_grad_()
    eager = loss(eager_leaf)
    eager.backward()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(compiled_leaf)
    compiled.backward()
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_leaf.grad, eager_leaf.grad)
