"""Storage packing of quantization codes along the last (input) dimension.

Codes of 2..4 bits go two to a byte (4-bit containers, the low nibble holds the even column, the high
nibble the odd one; an odd last dimension is padded with a zero code); codes of 5..8 bits take one
byte each. Any leading dimensions are kept, e.g. ``[E, out, in]`` for stacked experts.
"""

from __future__ import annotations

import torch

from moe.errors import UserError


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"bits={bits!r} is invalid: expected an integer in 2..8")


def container_bits(bits: int) -> int:
    """Bits of storage per code: 4 for ``bits <= 4``, else 8."""
    _check_bits(bits)
    return 4 if bits <= 4 else 8


def packed_size(in_features: int, bits: int) -> int:
    """Bytes per row of ``in_features`` codes after :func:`pack_codes`."""
    return -(-in_features // 2) if container_bits(bits) == 4 else in_features


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [..., in]`` (integers in ``[0, 2**bits - 1]``) into uint8 ``[..., packed_size(in, bits)]``.

    Codes outside the range raise ``ValueError``.
    """
    _check_bits(bits)
    if codes.dim() == 0:
        raise ValueError("pack_codes expects at least one dimension [..., in]")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"pack_codes expects integer codes, got dtype {codes.dtype}")
    maxq = 2**bits - 1
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > maxq):
        raise ValueError(f"pack_codes: codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {maxq}] "
                         f"for bits={bits}")
    codes = codes.to(torch.uint8)
    if container_bits(bits) == 8:
        return codes.clone()
    if codes.shape[-1] % 2:
        pad = torch.zeros(*codes.shape[:-1], 1, dtype=torch.uint8, device=codes.device)
        codes = torch.cat([codes, pad], dim=-1)
    low, high = codes[..., 0::2], codes[..., 1::2]  # [..., ceil(in/2)] each
    return low | (high << 4)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., packed_size(in_features, bits)]`` -> uint8 ``[..., in_features]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError(f"unpack_codes expects uint8 [..., bytes], got {packed.dtype} {tuple(packed.shape)}")
    want = packed_size(in_features, bits)
    if packed.shape[-1] != want:
        raise ValueError(f"unpack_codes: last dimension is {packed.shape[-1]} bytes; expected {want} for "
                         f"in_features={in_features} at bits={bits}")
    if container_bits(bits) == 8:
        return packed.clone()
    low, high = packed & 0x0F, packed >> 4  # [..., bytes] each
    both = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])  # [..., 2 * bytes]
    return both[..., :in_features].contiguous()
