"""Group-wise integer quantization and INT4 packing shared by quantgate's own quantizers.

Weights are quantized along the input dimension (the last one) in groups of ``group_size``
columns, each group with its own scale (and zero point when asymmetric). INT4 values are
stored two to a byte so a quantized model's footprint is its real storage: the low nibble
holds the even column, the high nibble the odd one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid of ``bits``: [-(2^(b-1)-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if symmetric:
        high = 2 ** (bits - 1) - 1
        return -high, high
    return 0, 2**bits - 1


def int_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """The smallest signed integer dtype holding the grid of ``bits`` (int16 for 8-bit asymmetric)."""
    return torch.int8 if int_range(bits, symmetric)[1] <= 127 else torch.int16


@dataclass(frozen=True)
class GroupSpec:
    """How a weight is quantized: bit width, group size along the input dim, symmetry."""

    bits: int = 4
    group_size: int | None = 64  # None: one group per output row (per-channel)
    symmetric: bool = True

    def groups(self, in_features: int) -> int:
        """How many groups one row of ``in_features`` columns splits into."""
        size = self.group_size or in_features
        if in_features % size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {size}")
        return in_features // size


def group_params(w: torch.Tensor, spec: GroupSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point if asymmetric) per (row, group) for weight ``w`` (out, in).

    Returned shapes are (out, groups); computed in float32 from the groups' min/max.
    """
    out_features, in_features = w.shape
    g = w.float().reshape(out_features, spec.groups(in_features), -1)
    low, high = int_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        scale = g.abs().amax(dim=-1).clamp(min=1e-12) / high
        return scale, None
    gmin, gmax = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
    scale = ((gmax - gmin) / (high - low)).clamp(min=1e-12)
    zero = torch.round(-gmin / scale).clamp(low, high)
    return scale, zero


def expand_groups(params: torch.Tensor, in_features: int) -> torch.Tensor:
    """Repeat per-group values (out, groups) to one value per column (out, in)."""
    return params.repeat_interleave(in_features // params.shape[1], dim=1)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round ``w`` (out, in) onto the grid given per-column ``scale``/``zero`` (out, in); int8 values
    (int16 for 8-bit asymmetric, whose grid [0, 255] does not fit int8)."""
    low, high = int_range(bits, zero is None)
    q = torch.round(w.float() / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(low, high).to(int_dtype(bits, zero is None))


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`quantize_with` in float32."""
    q = q.float()
    if zero is not None:
        q = q - zero
    return q * scale


def quantize_rtn(w: torch.Tensor, spec: GroupSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group quantization: (int8 values (out, in), scale (out, groups), zero or None)."""
    scale, zero = group_params(w, spec)
    in_features = w.shape[1]
    q = quantize_with(w, expand_groups(scale, in_features),
                      None if zero is None else expand_groups(zero, in_features), spec.bits)
    return q, scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 weight (out, in) from int values and per-group scale/zero (out, groups)."""
    in_features = q.shape[1]
    return dequantize_with(q, expand_groups(scale, in_features),
                           None if zero is None else expand_groups(zero, in_features))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 15] along the last dim two to a byte (uint8, last dim halved).

    Signed values are stored as their 4-bit two's complement; ``unpack_int4`` restores the
    sign when asked to.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"packing int4 needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 15):
        raise ValueError(f"values outside the 4-bit range: [{int(q.min())}, {int(q.max())}]")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 values, last dim doubled."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    if signed:
        low = torch.where(low > 7, low - 16, low)
        high = torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8)
