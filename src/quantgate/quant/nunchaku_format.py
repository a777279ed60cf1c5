"""Convert one linear layer between quantgate's SVDQuant tensors and nunchaku's checkpoint tensors.

Pure PyTorch, CPU-friendly; no nunchaku import. The layouts follow (read, not copied):

- deepcompressor ``deepcompressor/backend/nunchaku/utils.py`` (``NunchakuWeightPacker``: ``pack_weight``,
  ``pack_scale``, ``pack_micro_scale``, ``pack_lowrank_weight``), ``deepcompressor/backend/nunchaku/convert.py``
  (key names, un-smoothing of ``lora_down``, adaLN split order), ``deepcompressor/backend/tinychat/utils.py``
  (``pack_w4``: the AWQ W4A16 weight) and ``deepcompressor/backend/utils.py`` (tile sizes, E2M1 codebook);
- nunchaku ``src/Linear.cpp`` (``GEMM_W4A4``/``GEMV_AWQ`` tensor shapes and dtypes), ``src/kernels/zgemm/gemm_w4a4.cuh``
  (activations divided by ``smooth``; the low-rank down projection reads the raw input),
  ``src/kernels/awq/gemv_awq.cu`` (``w = q * wscales + wzeros``), ``nunchaku/models/linear.py``,
  ``nunchaku/models/transformers/transformer_flux_v2.py`` (v1 -> v2 renames), ``nunchaku/merge_safetensors.py``
  (safetensors metadata).

The on-disk keys are nunchaku's single-file / C++ names (``qweight``, ``wscales``, ``bias``, ``smooth``,
``smooth_orig``, ``lora_down``, ``lora_up``, ``wtscale``, ``wcscales``); nunchaku's v2 Python modules rename
them (:data:`V2_PARAM_NAMES`).

Conventions, quantgate vs nunchaku:

- smoothing: both *divide* activations by ``λ`` (``smooth``) and store the smoothed weight ``W·diag(λ)``;
- low-rank branch: quantgate's ``lora_down`` (r, in) reads ``x / λ``; nunchaku's ``lora_down`` reads the raw ``x``
  and is stored transposed (in, r), so it is ``(lora_down / λ)ᵀ``. That rescale is one bf16 rounding each way:
  the round trip is bit-exact for every other tensor, and for ``lora_down`` only where ``/ λ`` is exact
  (powers of two); otherwise ``lora_down`` comes back within one bf16 rounding;
- rank: nunchaku pads it to a multiple of 16 with zeros (its kernels need that); :func:`to_svdquant_linear`
  drops trailing all-zero rank columns again;
- INT4 codes: quantgate's grid is [-7, 7], nunchaku's [-8, 7] (both fine here); group 64 only, so layers whose
  quantgate group is smaller (tiny test models) cannot be converted;
- shapes: N and K must be multiples of 128 (nunchaku pads; this module refuses rather than pad, so that
  unpack is the exact inverse); every per-channel vector (bias, smooth, wcscales) is permuted per 128 channels;
- post-GELU (``unsigned_input``) INT4 layers: nunchaku adds 0.171875 to the activations and does not subtract it
  after quantization, quantgate does (``x̂ + s`` quantized, then ``- s``); the difference ``deq(R)·(0.171875/λ)`` is
  folded into nunchaku's bias (fp32, rounded once to bf16: not bit-exact);
- NVFP4: quantgate has no per-channel ``wcscales`` (written as absent); quantgate's optional dynamic activation
  tensor scale has no nunchaku counterpart and is refused;
- W4A16: nunchaku stores ``wzeros = -zero·scale`` in bf16 (quantgate keeps the integer zero); the integer is
  recovered exactly. adaLN linears need ``adanorm_splits`` (rows interleaved, +1 folded into the scale chunks' bias).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from quantgate.quant.int4 import expand_groups, unpack_int4
from quantgate.quant.nvfp4 import decode_e2m1, fp8_dtype
from quantgate.quant.svdquant import GELU_SHIFT, Int4WeightOnlyLinear, SVDQuantLinear

TILE = 128  # nunchaku's W4A4 warp tile in N (warp_n) and in K (mem_k 64 x 2 unrolls)
INT4_GROUP = 64
NVFP4_GROUP = 16
RANK_TILE = 16  # the low-rank branch is packed in 16 x 16 blocks; rank padded to a multiple of 16
AWQ_GROUP = 64

# -- names (deepcompressor convert.py local_name_map, nunchaku src/FluxModel.cpp registerChildren) ---------------

# nunchaku local name -> (kind, diffusers source linears, note). "w4a4" = SVDQuant GEMM_W4A4, "w4a16" = GEMV_AWQ.
FLUX_DOUBLE_BLOCK: dict[str, tuple[str, tuple[str, ...], str]] = {
    "norm1.linear": ("w4a16", ("norm1.linear",), "adanorm_splits=6"),
    "norm1_context.linear": ("w4a16", ("norm1_context.linear",), "adanorm_splits=6"),
    "qkv_proj": ("w4a4", ("attn.to_q", "attn.to_k", "attn.to_v"), "concatenated along out: 3 x 3072"),
    "qkv_proj_context": ("w4a4", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "concatenated along out"),
    "out_proj": ("w4a4", ("attn.to_out.0",), ""),
    "out_proj_context": ("w4a4", ("attn.to_add_out",), ""),
    "mlp_fc1": ("w4a4", ("ff.net.0.proj",), ""),
    "mlp_fc2": ("w4a4", ("ff.net.2",), "post-GELU input"),
    "mlp_context_fc1": ("w4a4", ("ff_context.net.0.proj",), ""),
    "mlp_context_fc2": ("w4a4", ("ff_context.net.2",), "post-GELU input"),
}
FLUX_SINGLE_BLOCK: dict[str, tuple[str, tuple[str, ...], str]] = {
    "norm.linear": ("w4a16", ("norm.linear",), "adanorm_splits=3"),
    "qkv_proj": ("w4a4", ("attn.to_q", "attn.to_k", "attn.to_v"), "concatenated along out"),
    "mlp_fc1": ("w4a4", ("proj_mlp",), "3072 -> 12288; shares qkv_proj's smoothing (same input)"),
    "out_proj": ("w4a4", ("proj_out",), "proj_out.weight[:, :3072], no bias (zeros)"),
    "mlp_fc2": ("w4a4", ("proj_out",), "proj_out.weight[:, 3072:] (12288 -> 3072), carries proj_out.bias; post-GELU"),
}
FLUX_BLOCK_PREFIXES = {"double": "transformer_blocks.{i}.", "single": "single_transformer_blocks.{i}."}
SINGLE_BLOCK_ATTN_INPUTS = 3072  # proj_out's first 3072 inputs are the attention output, the rest the MLP's

# on-disk (v1) parameter name -> nunchaku v2 Python parameter name (transformer_flux_v2.convert_flux_state_dict)
V2_PARAM_NAMES = {"qweight": "qweight", "wscales": "wscales", "bias": "bias", "smooth": "smooth_factor",
                  "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down", "lora_up": "proj_up",
                  "wtscale": "wtscale", "wcscales": "wcscales", "wzeros": "wzeros"}
# on-disk module name -> v2 module path, per block kind
V2_MODULE_NAMES = {
    "double": {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
               "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
               "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
               "norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
               "norm_added_k": "attn.norm_added_k"},
    "single": {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "norm_q": "attn.norm_q",
               "norm_k": "attn.norm_k"},
}
# safetensors metadata keys nunchaku writes (merge_safetensors) and reads ("config" is required by _build_model)
METADATA_KEYS = ("config", "comfy_config", "model_class", "quantization_config")


def checkpoint_filename(precision: str, rank: int, model: str) -> str:
    """nunchaku's file name, e.g. ``svdq-int4_r32-flux.1-dev.safetensors`` (precision "int4" or "fp4")."""
    if precision not in ("int4", "fp4"):
        raise ValueError(f"precision must be 'int4' or 'fp4', got {precision!r}")
    return f"svdq-{precision}_r{rank}-{model}.safetensors"


def quantization_config(precision: str, rank: int) -> dict:
    """The ``quantization_config`` metadata (JSON-encode it) as ``nunchaku/merge_safetensors.py`` builds it."""
    fp4 = precision == "fp4"
    dtype, group = ("fp4_e2m1_all", NVFP4_GROUP) if fp4 else ("int4", INT4_GROUP)
    return {"method": "svdquant",
            "weight": {"dtype": dtype, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": group},
            "activation": {"dtype": dtype, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": group},
            "rank": rank}


# -- layout primitives ------------------------------------------------------------------------------------------


def check_tiles(out_features: int, in_features: int) -> None:
    """Raise unless (N, K) fit nunchaku's W4A4 tiles (multiples of 128)."""
    if out_features % TILE or in_features % TILE:
        raise ValueError(f"nunchaku's W4A4 layout needs out_features and in_features to be multiples of {TILE}, "
                         f"got ({out_features}, {in_features})")


def pack_w4a4_weight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) (signed INT4 [-8, 7] or E2M1 codes [0, 15]) -> nunchaku ``qweight`` int8 (N, K/2).

    Per 128 x 64 tile (tiles ordered n-tile major), code (n, k) with n = 16·p + 8·s + l, k = 32·a + 8·b + c
    goes to int32 word ((p·8 + l)·4 + b)·4 + s·2 + a, nibble c (low nibble first, little-endian bytes).
    The (N, K/2) view is nunchaku's; its rows are not output channels.
    """
    n, k = codes.shape
    check_tiles(n, k)
    nib = codes.to(torch.int16) & 0xF
    # (nt, p, s, l, kt, a, b, c) -> (nt, kt, p, l, b, s, a, c): the lane-major order the MMA loads
    t = nib.reshape(n // TILE, 8, 2, 8, k // 64, 2, 4, 8).permute(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1, 4, 2)
    return (t[..., 0] | (t[..., 1] << 4)).to(torch.uint8).view(torch.int8).reshape(n, k // 2)


def unpack_w4a4_weight(qweight: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_w4a4_weight`: int8 codes (N, K), sign-extended when ``signed``."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    check_tiles(n, k)
    b = qweight.contiguous().view(torch.uint8).to(torch.int16)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1)
    t = nib.reshape(n // TILE, k // 64, 8, 8, 4, 2, 2, 8).permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)
    if signed:
        t = torch.where(t > 7, t - 16, t)
    return t.to(torch.int8)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per-(channel, group) scales (N, G) -> nunchaku (G, N) (``pack_scale``; one 16-bit value per entry).

    Memory order: n-tile of 128, group, then within the tile n = 16·a + 8·b + 2·c + d at 16·a + 4·c + 2·b + d.
    As in deepcompressor, the (G, N) shape is nominal: for N > 128 its rows are not groups.
    """
    n, g = scales.shape
    if n % TILE:
        raise ValueError(f"nunchaku's scale layout needs a multiple of {TILE} channels, got {n}")
    return scales.reshape(n // TILE, 8, 2, 4, 2, g).permute(0, 5, 1, 3, 2, 4).reshape(g, n)


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_scales`: (G, N) -> (N, G)."""
    g, n = packed.shape
    return packed.reshape(n // TILE, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, g)


def pack_channels(vector: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (bias, smooth, wcscales) in nunchaku's order: :func:`pack_scales` with one group."""
    return pack_scales(vector.reshape(-1, 1)).reshape(-1)


def unpack_channels(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_channels`."""
    return unpack_scales(packed.reshape(1, -1)).reshape(-1)


def pack_fp8_scales(scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 block scales, FP8 E4M3 (N, K/16) -> nunchaku (K/16, N) (``pack_micro_scale``).

    Per n-tile of 128 and 64 input columns (4 blocks): n = 32·s + 8·a + b with block j goes to 64·b + 16·a + 4·s + j
    (each lane reads four channels' four block scales as one 32-bit word).
    """
    n, g = scales.shape
    if n % TILE or g % 4:
        raise ValueError(f"nunchaku's FP8 scale layout needs N % {TILE} == 0 and K % 64 == 0, got N={n}, K={g * 16}")
    b = scales.contiguous().view(torch.uint8)  # permute the bytes: FP8 has no arithmetic to lose
    t = b.reshape(n // TILE, 4, 4, 8, g // 4, 4).permute(0, 4, 3, 2, 1, 5)
    return t.reshape(g, n).view(scales.dtype)


def unpack_fp8_scales(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp8_scales`: (K/16, N) -> (N, K/16)."""
    g, n = packed.shape
    t = packed.contiguous().view(torch.uint8).reshape(n // TILE, g // 4, 8, 4, 4, 4).permute(0, 4, 3, 2, 1, 5)
    return t.reshape(n, g).view(packed.dtype)


def _pad_rank(t: torch.Tensor, dim: int) -> torch.Tensor:
    extra = -t.shape[dim] % RANK_TILE
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pack_lora_down(lora_down: torch.Tensor) -> torch.Tensor:
    """Down projection (r, K) (reading the raw input) -> nunchaku ``lora_down`` (K, r16), r16 = r rounded up to 16.

    16 x 16 blocks ordered (K block, rank block); inside, rank i = 8·p + l and channel c = 8·q + 2·b + e
    go to 32·l + 8·b + 4·p + 2·q + e.
    """
    r, k = lora_down.shape
    if r == 0:
        return lora_down.new_zeros(k, 0)
    x = _pad_rank(lora_down, 0).t()  # (K, r16)
    rp = x.shape[1] // RANK_TILE
    t = x.reshape(k // RANK_TILE, 2, 4, 2, rp, 2, 8).permute(0, 4, 6, 2, 5, 1, 3)
    return t.reshape(k, rp * RANK_TILE)


def unpack_lora_down(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_lora_down`: (K, r16) -> (r16, K) (padding rows kept)."""
    k, r = packed.shape
    if r == 0:
        return packed.new_zeros(0, k)
    t = packed.reshape(k // RANK_TILE, r // RANK_TILE, 8, 4, 2, 2, 2).permute(0, 5, 3, 6, 1, 4, 2)
    return t.reshape(k, r).t().contiguous()


def pack_lora_up(lora_up: torch.Tensor) -> torch.Tensor:
    """Up projection (N, r) -> nunchaku ``lora_up`` (N, r16): the :func:`pack_lora_down` block order with
    channel n = 8·p + l and rank i = 8·q + 2·b + e."""
    n, r = lora_up.shape
    if r == 0:
        return lora_up.new_zeros(n, 0)
    x = _pad_rank(lora_up, 1)
    rp = x.shape[1] // RANK_TILE
    t = x.reshape(n // RANK_TILE, 2, 8, rp, 2, 4, 2).permute(0, 3, 2, 5, 1, 4, 6)
    return t.reshape(n, rp * RANK_TILE)


def unpack_lora_up(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_lora_up`: (N, r16) -> (N, r16)."""
    n, r = packed.shape
    if r == 0:
        return packed.new_zeros(n, 0)
    t = packed.reshape(n // RANK_TILE, r // RANK_TILE, 8, 4, 2, 2, 2).permute(0, 4, 2, 1, 5, 3, 6)
    return t.reshape(n, r)


# -- one W4A4 layer -----------------------------------------------------------------------------------------------


class W4A4Parts(NamedTuple):
    """A W4A4 layer in plain (unpermuted) form, in nunchaku's conventions (``lora_down`` reads the raw input)."""

    codes: torch.Tensor  # int8 (N, K): signed INT4, or E2M1 codes 0..15 (NVFP4)
    scales: torch.Tensor  # (N, K/64) bf16/fp16 (INT4) or (N, K/16) FP8 E4M3 (NVFP4)
    bias: torch.Tensor  # (N,)
    smooth: torch.Tensor  # (K,) λ: activations are divided by it
    lora_down: torch.Tensor  # (r16, K)
    lora_up: torch.Tensor  # (N, r16)
    wtscale: torch.Tensor | None = None  # (1,) fp32, NVFP4 only
    wcscales: torch.Tensor | None = None  # (N,), NVFP4 only, optional


def pack_w4a4(parts: W4A4Parts) -> dict[str, torch.Tensor]:
    """nunchaku's tensors of one W4A4 layer (INT4 or NVFP4, told by the scales' dtype)."""
    n, k = parts.codes.shape
    check_tiles(n, k)
    fp4 = parts.scales.dtype == fp8_dtype()
    group = NVFP4_GROUP if fp4 else INT4_GROUP
    if parts.scales.shape != (n, k // group):
        raise ValueError(f"scales must be (N, K/{group}) = {(n, k // group)}, got {tuple(parts.scales.shape)}")
    codes = parts.codes
    if codes.numel() and (int(codes.min()) < (0 if fp4 else -8) or int(codes.max()) > (15 if fp4 else 7)):
        raise ValueError(f"codes outside the {'E2M1 [0, 15]' if fp4 else 'INT4 [-8, 7]'} range")
    smooth = pack_channels(parts.smooth)
    out = {"qweight": pack_w4a4_weight(codes),
           "wscales": pack_fp8_scales(parts.scales) if fp4 else pack_scales(parts.scales),
           "bias": pack_channels(parts.bias),
           "smooth": smooth, "smooth_orig": smooth.clone(),  # deepcompressor writes both (smooth_fused=False)
           "lora_down": pack_lora_down(parts.lora_down), "lora_up": pack_lora_up(parts.lora_up)}
    if fp4:
        out["wtscale"] = (parts.wtscale if parts.wtscale is not None else torch.ones(1)).float().reshape(1)
        if parts.wcscales is not None:
            out["wcscales"] = pack_channels(parts.wcscales)
    return out


def unpack_w4a4(tensors: dict[str, torch.Tensor]) -> W4A4Parts:
    """Inverse of :func:`pack_w4a4` (the rank stays padded to 16)."""
    fp4 = tensors["wscales"].dtype == fp8_dtype()
    wcscales = tensors.get("wcscales")
    return W4A4Parts(
        codes=unpack_w4a4_weight(tensors["qweight"], signed=not fp4),
        scales=unpack_fp8_scales(tensors["wscales"]) if fp4 else unpack_scales(tensors["wscales"]),
        bias=unpack_channels(tensors["bias"]), smooth=unpack_channels(tensors["smooth"]),
        lora_down=unpack_lora_down(tensors["lora_down"]), lora_up=unpack_lora_up(tensors["lora_up"]),
        wtscale=tensors.get("wtscale", torch.ones(1)).float().reshape(1) if fp4 else None,
        wcscales=None if wcscales is None or wcscales.numel() == 0 else unpack_channels(wcscales))


def pack_w4a4_int4(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, smooth: torch.Tensor,
                   lora_down: torch.Tensor, lora_up: torch.Tensor) -> dict[str, torch.Tensor]:
    """INT4 W4A4: codes int (N, K) in [-8, 7], scales (N, K/64), bias (N,), smooth (K,), lora_down (r, K) reading
    the raw input, lora_up (N, r) -> nunchaku's tensors."""
    return pack_w4a4(W4A4Parts(codes, scales, bias, smooth, lora_down, lora_up))


def unpack_w4a4_int4(tensors: dict[str, torch.Tensor]) -> W4A4Parts:
    """Inverse of :func:`pack_w4a4_int4`."""
    if tensors["wscales"].dtype == fp8_dtype():
        raise ValueError("these are NVFP4 tensors (FP8 wscales); use unpack_w4a4")
    return unpack_w4a4(tensors)


def dequantize_w4a4(tensors: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual (N, K) in the smoothed space, lora_down (r16, K) on the raw input, lora_up (N, r16), smooth (K,)),
    float32: ``y ≈ (x / smooth) @ residualᵀ + (x @ lora_downᵀ) @ lora_upᵀ + bias``."""
    p = unpack_w4a4(tensors)
    n, k = p.codes.shape
    if p.wtscale is None:
        residual = p.codes.float() * expand_groups(p.scales.float(), k)
    else:
        residual = decode_e2m1(p.codes) * expand_groups(p.scales.float(), k) * p.wtscale
        if p.wcscales is not None:
            residual = residual * p.wcscales.float()[:, None]
    return residual, p.lora_down.float(), p.lora_up.float(), p.smooth.float()


def _gelu_shift_bias(residual: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """What nunchaku's unsubtracted activation shift adds to the output: ``deq(R) · (0.171875 / λ)``."""
    return residual @ (GELU_SHIFT / smooth.float())


def from_svdquant_linear(layer: SVDQuantLinear) -> dict[str, torch.Tensor]:
    """A quantgate :class:`SVDQuantLinear` as nunchaku's tensors (on-disk names; see the module docstring)."""
    fp4 = layer.precision == "nvfp4"
    group = NVFP4_GROUP if fp4 else INT4_GROUP
    if layer.group_size != group:
        raise ValueError(f"nunchaku's {layer.precision} needs group size {group}, the layer has {layer.group_size}")
    if layer.act_tensor_scale:
        raise ValueError("nunchaku's NVFP4 activations have no dynamic tensor scale (act_tensor_scale=True)")
    dtype = layer.smooth.dtype
    smooth = layer.smooth
    rank = layer.rank
    down = (layer.lora_down[:rank].float() / smooth.float()).to(dtype)  # nunchaku's branch reads x, not x / λ
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features, dtype=dtype,
                                                                 device=smooth.device)
    if layer.unsigned_input:
        bias = (bias.float() - _gelu_shift_bias(layer.residual(), smooth)).to(dtype)
    codes = unpack_int4(layer.qweight, signed=not fp4)
    parts = W4A4Parts(codes, layer.wscales, bias, smooth, down, layer.lora_up[:, :rank],
                      layer.wtscale if fp4 else None)
    return pack_w4a4(parts)


def to_svdquant_linear(tensors: dict[str, torch.Tensor], rank: int | None = None, unsigned_input: bool = False,
                       bias: bool | None = None, dtype: torch.dtype = torch.bfloat16) -> SVDQuantLinear:
    """nunchaku's tensors of one W4A4 layer as a quantgate :class:`SVDQuantLinear`.

    ``rank`` None drops trailing all-zero rank columns (nunchaku's padding to 16). ``unsigned_input``: the layer
    reads post-GELU activations (INT4), whose shift nunchaku folded into the bias. ``bias`` None keeps the bias
    unless it is all zeros (nunchaku always stores one).
    """
    p = unpack_w4a4(tensors)
    n, k = p.codes.shape
    fp4 = p.wtscale is not None
    if p.wcscales is not None and not bool((p.wcscales.float() == 1).all()):
        raise ValueError("quantgate's NVFP4 layer has no per-channel weight scale (wcscales other than 1)")
    if rank is None:
        used = (p.lora_down != 0).any(dim=1) | (p.lora_up != 0).any(dim=0)
        rank = int(used.nonzero().max()) + 1 if bool(used.any()) else 0
    if bias is None:
        bias = bool((p.bias != 0).any()) or unsigned_input
    layer = SVDQuantLinear(k, n, rank, "nvfp4" if fp4 else "int4", NVFP4_GROUP if fp4 else INT4_GROUP, bias,
                           device=p.codes.device, dtype=dtype, unsigned_input=unsigned_input)
    nibbles = (p.codes.to(torch.int16) & 0xF).to(torch.uint8)
    with torch.no_grad():
        layer.qweight.copy_(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4))  # quantgate's pack_int4 order
        layer.wscales.copy_(p.scales)
        if fp4:
            layer.wtscale.copy_(p.wtscale)
        layer.smooth.copy_(p.smooth)
        layer.lora_down.copy_((p.lora_down[:rank].float() * p.smooth.float()).to(dtype))
        layer.lora_up.copy_(p.lora_up[:, :rank])
        if bias:
            b = p.bias.float()
            if layer.unsigned_input:
                b = b + _gelu_shift_bias(layer.residual(), layer.smooth)
            layer.bias.copy_(b.to(dtype))
    return layer


# -- W4A16 (AWQ GEMV) -------------------------------------------------------------------------------------------


def pack_w4a16_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Asymmetric INT4 per group of 64: codes (N, K) in [0, 15], scales and integer zeros (N, K/64), bias (N,)
    -> nunchaku's ``qweight`` int32 (N/4, K/2), ``wscales`` and ``wzeros`` (K/64, N) in the scales' dtype, ``bias``.

    Weight = ``q * wscales + wzeros``, so ``wzeros = -zero * scale`` (rounded once to the scales' dtype).
    ``qweight``: per row and 32 columns, 16-bit word i holds columns i, i+8, i+16, i+24 in nibbles 0..3; the 16
    words of each 64 columns of rows 4m..4m+3 sit side by side in row m (word column 64·(k//64) + 16·(n%4) + ...).
    """
    n, k = codes.shape
    if n % 4 or k % AWQ_GROUP:
        raise ValueError(f"nunchaku's W4A16 layout needs N % 4 == 0 and K % {AWQ_GROUP} == 0, got ({n}, {k})")
    if scales.shape != (n, k // AWQ_GROUP) or zeros.shape != scales.shape:
        raise ValueError(f"scales and zeros must be (N, K/{AWQ_GROUP}) = {(n, k // AWQ_GROUP)}")
    nib = (codes.to(torch.int32) & 0xF).reshape(n, k // 32, 4, 8)
    words = nib[:, :, 0] | (nib[:, :, 1] << 4) | (nib[:, :, 2] << 8) | (nib[:, :, 3] << 12)  # (N, K/32, 8)
    words = words.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)  # two's complement halves
    out = {"qweight": words.view(torch.int32),
           "wscales": scales.t().contiguous(),
           "wzeros": (-(zeros.float() * scales.float())).to(scales.dtype).t().contiguous()}
    out["bias"] = bias if bias is not None else torch.zeros(n, dtype=scales.dtype, device=scales.device)
    return out


def unpack_w4a16_awq(tensors: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_w4a16_awq`: (codes int8 (N, K), scales (N, G), zeros (N, G) integer-valued float32,
    bias (N,)). The integer zeros come back exactly (``|rounding| <= 15·2^-8 < 0.5``)."""
    q = tensors["qweight"]
    n, k = q.shape[0] * 4, q.shape[1] * 2
    words = q.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    words = words.reshape(n // 4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 8)
    codes = torch.stack([(words >> (4 * j)) & 0xF for j in range(4)], dim=2).reshape(n, k).to(torch.int8)
    scales = tensors["wscales"].t().contiguous()
    s = scales.float()
    zeros = torch.where(s != 0, torch.round(-tensors["wzeros"].t().float() / s.where(s != 0, torch.ones_like(s))),
                        torch.zeros_like(s))
    return codes, scales, zeros, tensors["bias"]


def interleave_adanorm(t: torch.Tensor, splits: int) -> torch.Tensor:
    """Rows (or entries) of an adaLN linear from diffusers' chunk order (shift, scale, gate, ...) to nunchaku's
    interleaved order (row ``c·splits + j`` = chunk j's row c)."""
    n = t.shape[0]
    return t.reshape(splits, n // splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def deinterleave_adanorm(t: torch.Tensor, splits: int) -> torch.Tensor:
    """Inverse of :func:`interleave_adanorm`."""
    n = t.shape[0]
    return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _scale_chunks(splits: int) -> list[int]:
    # deepcompressor adds 1 to chunks 1 and splits-2: (shift, scale, gate[, shift, scale, gate]); nunchaku then
    # computes norm(x) * scale + shift without diffusers' "1 +"
    return sorted({1, splits - 2})


def from_int4_weight_only_linear(layer: Int4WeightOnlyLinear, adanorm_splits: int = 1) -> dict[str, torch.Tensor]:
    """A quantgate W4A16 layer as nunchaku's GEMV_AWQ tensors. ``adanorm_splits`` 6 (AdaLayerNormZero) or 3
    (...Single) re-orders rows and folds the +1 of ``1 + scale`` into the bias (bf16: not bit-exact); 1 for a
    plain linear."""
    if layer.group_size != AWQ_GROUP:
        raise ValueError(f"nunchaku's W4A16 needs group size {AWQ_GROUP}, the layer has {layer.group_size}")
    codes = unpack_int4(layer.qweight, signed=False)
    scales, zeros = layer.scales, layer.zeros.float()
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features, dtype=scales.dtype)
    if adanorm_splits > 1:
        chunk = layer.out_features // adanorm_splits
        b = bias.float().clone().reshape(adanorm_splits, chunk)
        b[_scale_chunks(adanorm_splits)] += 1
        codes, scales, zeros = (interleave_adanorm(t, adanorm_splits) for t in (codes, scales, zeros))
        bias = interleave_adanorm(b.reshape(-1), adanorm_splits).to(scales.dtype)
    return pack_w4a16_awq(codes, scales, zeros, bias)


def to_int4_weight_only_linear(tensors: dict[str, torch.Tensor], adanorm_splits: int = 1,
                               bias: bool = True) -> Int4WeightOnlyLinear:
    """Inverse of :func:`from_int4_weight_only_linear`."""
    codes, scales, zeros, b = unpack_w4a16_awq(tensors)
    n, k = codes.shape
    if adanorm_splits > 1:
        codes, scales, zeros, b = (deinterleave_adanorm(t, adanorm_splits) for t in (codes, scales, zeros, b))
        b = b.float().clone().reshape(adanorm_splits, n // adanorm_splits)
        b[_scale_chunks(adanorm_splits)] -= 1
        b = b.reshape(-1).to(scales.dtype)
    layer = Int4WeightOnlyLinear.empty(k, n, AWQ_GROUP, bias)
    nibbles = codes.to(torch.uint8)
    layer.qweight = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    layer.scales, layer.zeros = scales.clone(), zeros.to(torch.uint8)
    layer.bias = b.clone() if bias else None
    return layer
