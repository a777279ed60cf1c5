"""NVFP4: 4-bit floats (E2M1) in blocks of 16 with an FP8 (E4M3) scale per block.

NVIDIA's Blackwell format, as SVDQuant's NVFP4 variant uses it: each value is one of
±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; every 16 consecutive values along the input dimension share a
scale stored as FP8 E4M3, and one FP32 scale per tensor brings the block scales into E4M3's
range (two-level scaling). Codes are 4 bits: sign in bit 3, the magnitude's index in bits
0-2, so they pack two to a byte like INT4 (``quantgate.quant.int4.pack_int4``).

This is a numerical reference (quantize, dequantize), not a Blackwell kernel.
"""

from __future__ import annotations

import torch

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16


def fp8_dtype() -> torch.dtype:
    """torch's FP8 E4M3 dtype; a clear error on a torch too old to have it."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise RuntimeError(f"NVFP4 needs torch.float8_e4m3fn for its block scales (torch >= 2.1); "
                           f"torch {torch.__version__} has none")
    return dtype


def _grid(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_GRID, dtype=torch.float32, device=device)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 0..15) of the E2M1 values nearest to ``x`` (saturating at ±6).

    Ties round to the even code, as the hardware's round-to-nearest-even does.
    """
    grid = _grid(x.device)
    mid = (grid[1:] + grid[:-1]) / 2
    mag = x.float().abs().clamp(max=E2M1_MAX)
    index = torch.bucketize(mag, mid)  # a value on a midpoint lands on the lower neighbour
    on_mid = (index < len(mid)) & (mag == mid[index.clamp(max=len(mid) - 1)]) & (index % 2 == 1)
    index = index + on_mid.long()
    sign = (x < 0) | ((x == 0) & torch.signbit(x))
    return (index | (sign.long() << 3)).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit E2M1 codes."""
    codes = codes.long()
    magnitude = _grid(codes.device)[codes & 7]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def quantize_nvfp4(x: torch.Tensor, block: int = BLOCK,
                   tensor_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (rows, cols) along its last dim: (codes uint8 (rows, cols), E4M3 scale per
    block (rows, cols / block), FP32 tensor scale (1,)).

    The tensor scale maps the largest block scale onto E4M3's maximum, so block scales use its
    whole range; dequantized value = E2M1(code) * float(block scale) * tensor scale. With
    ``tensor_scale=False`` it is 1: each block's E4M3 scale alone (nunchaku's activations), so a
    row's values do not depend on the other rows'; blocks whose scale is below E4M3's smallest
    subnormal (2^-9) flush to zero.
    """
    rows, cols = x.shape
    if cols % block:
        raise ValueError(f"NVFP4 needs the last dimension ({cols}) to be a multiple of the block size {block}")
    xf = x.float()
    if tensor_scale:
        tensor_scale = (xf.abs().amax() / (E2M1_MAX * E4M3_MAX)).clamp(min=1e-30).reshape(1)
    else:
        tensor_scale = torch.ones(1, dtype=torch.float32, device=x.device)
    blocks = xf.reshape(rows, cols // block, block)
    wanted = blocks.abs().amax(dim=-1) / E2M1_MAX / tensor_scale
    block_scale = wanted.clamp(max=E4M3_MAX).to(fp8_dtype())
    effective = (block_scale.float() * tensor_scale)[..., None]
    scaled = torch.where(effective > 0, blocks / effective.clamp(min=1e-30), torch.zeros_like(blocks))
    return encode_e2m1(scaled).reshape(rows, cols), block_scale, tensor_scale


def dequantize_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """float32 values from :func:`quantize_nvfp4`'s output."""
    rows, cols = codes.shape
    values = decode_e2m1(codes).reshape(rows, block_scale.shape[1], -1)
    return (values * (block_scale.float() * tensor_scale.float())[..., None]).reshape(rows, cols)


def fake_quantize_nvfp4(x: torch.Tensor, block: int = BLOCK, tensor_scale: bool = True) -> torch.Tensor:
    """``x`` rounded through NVFP4 (per-row blocks of ``block``; a dynamic tensor scale unless
    ``tensor_scale=False``), same dtype."""
    flat = x.reshape(-1, x.shape[-1])
    return dequantize_nvfp4(*quantize_nvfp4(flat, block, tensor_scale)).to(x.dtype).reshape(x.shape)
