"""Spreading a model built by ``moe`` over ranks: process groups, the all-to-all dispatcher,
expert parallelism applied to a built model, DeepSpeed engine and checkpoint glue.

Imports ``moe`` and ``kernels``; never ``launch`` or ray. Filled in by the expert-parallelism work;
until then a model runs on one device with ``moe.LocalDispatcher``.
"""
