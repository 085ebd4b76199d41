"""MoE-aware weight quantization in pure torch: round-to-nearest, GPTQ, MoEQuant's AGQ Hessian and
EBSS calibration sampling, EoRA's low-rank compensation, packed storage, and the layer-by-layer calibration steps
(:mod:`moe.quant.calibrate`) that ``launch.quantize`` spreads over Ray.

Weight convention: a linear weight ``W [out, in]`` (``nn.Linear.weight``), ``y = x @ W.T``.

    >>> import torch
    >>> from moe.quant import Hessian, QuantSpec, gptq
    >>> x, w = torch.randn(256, 16), torch.randn(8, 16)
    >>> h = Hessian(16).add(x, weight=torch.rand(256))  # AGQ: rows weighted by gate scores
    >>> q = gptq(w, h, QuantSpec(bits=4, group_size=8))
    >>> q.dequantize().shape
    torch.Size([8, 16])
"""

from moe.quant.ebss import (
    default_calibration_size,
    ebss_first_tokens,
    ebss_generate,
    ebss_search,
    expert_balance_sigma,
    expert_usage,
    random_windows,
)
from moe.quant.eora import LowRankCorrection, eora, eora_factors
from moe.quant.gptq import Hessian, gptq, layer_output_error
from moe.quant.pack import container_bits, pack_codes, packed_size, unpack_codes
from moe.quant.quantizer import (
    QuantizedWeight,
    QuantSpec,
    dequantize_codes,
    group_bounds,
    quant_params,
    quantize_codes,
    rtn,
)

__all__ = [
    "default_calibration_size",
    "ebss_first_tokens",
    "ebss_generate",
    "ebss_search",
    "expert_balance_sigma",
    "expert_usage",
    "random_windows",
    "Hessian",
    "LowRankCorrection",
    "QuantSpec",
    "QuantizedWeight",
    "container_bits",
    "dequantize_codes",
    "eora",
    "eora_factors",
    "gptq",
    "group_bounds",
    "layer_output_error",
    "pack_codes",
    "packed_size",
    "quant_params",
    "quantize_codes",
    "rtn",
    "unpack_codes",
]
