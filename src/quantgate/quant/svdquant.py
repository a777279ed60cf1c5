"""SVDQuant (arXiv 2411.05007): W4A4 with a 16-bit low-rank branch that absorbs outliers.

For a linear layer ``y = x Wᵀ`` (torch's (out, in) weight):

1. smoothing: per input channel ``λ_j = max|x_j|^α / max|W_:j|^(1-α)`` (SmoothQuant's rule) or
   ``λ_j = max|x_j|^α`` (the activation-only form) migrates activation outliers into the
   weight: ``x̂ = x / λ``, ``Ŵ = W · diag(λ)``. As deepcompressor (the authors' calibration
   code) does, both forms are searched per layer over α = 0.05, 0.10 … 0.95, plus "no
   smoothing": 39 candidates, the one with the smallest output error on a sample of the layer's
   real calibration inputs wins (``SVDQuantConfig.alphas`` and ``smoothing_forms``);
2. low-rank branch: the top-``r`` singular triplets of ``Ŵ`` (``lora_up`` (out, r) holds U·S,
   ``lora_down`` (r, in) holds Vᵀ), kept in bf16. The winner's branch is then refined as
   deepcompressor does, ``L ← SVD_r(Ŵ − Q(Ŵ − L))``, up to ``low_rank_iterations`` times (100),
   stopping at the first iteration that does not lower the output error and keeping the best;
   the refinement runs for the winning strength only (for all 39 it would cost 39 x 100 SVDs a
   layer);
3. residual ``R = Ŵ - lora_up · lora_down`` quantized to signed INT4 with one bf16 scale per
   group of 64 input channels, stored packed two values a byte (or NVFP4: E2M1 values with an
   FP8 E4M3 scale per 16 and one FP32 tensor scale);
4. at run time ``y = Q(x̂) · deq(R)ᵀ + (x̂ · lora_downᵀ) · lora_upᵀ + b`` with ``Q`` quantizing
   activations per token and group of 64 (INT4) or 16 (NVFP4) on the fly; the inputs of
   post-GELU linears (``unsigned_inputs``) are shifted by ``0.171875 / λ`` and quantized
   unsigned to [0, 15], as nunchaku does.

``SVDQuantLinear`` is a *reference*: the footprint is real (packed weights), the arithmetic is
simulated (the residual is dequantized and activations fake-quantized, then a bf16 matmul), so
it is slower than bf16, not a fused W4A4 kernel like nunchaku's. Its ``low_rank`` switch turns
the branch off to time what the unfused branch costs (``quantgate.quant.lowrank``).

The per-image linears inside the blocks (adaLN modulation: one row per image) are W4A16 as in
nunchaku, here round-to-nearest asymmetric INT4 per group of 64 (``Int4WeightOnlyLinear``);
AWQ's activation-aware scale search is not applied to them. ``norm_out`` and the embedders
stay 16-bit, as nunchaku keeps them (``SVDQuantConfig.bf16_linears``).
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantgate.quant.calibration import ChannelAbsMax
from quantgate.quant.int4 import GroupSpec, expand_groups, pack_int4, quantize_rtn, quantize_with, unpack_int4
from quantgate.quant.nvfp4 import BLOCK as NVFP4_BLOCK
from quantgate.quant.nvfp4 import dequantize_nvfp4, fake_quantize_nvfp4, quantize_nvfp4

PRECISIONS = ("int4", "nvfp4")
INT4_MAX = 7  # signed symmetric grid [-7, 7]
# nunchaku shifts post-GELU inputs (GELU's minimum is about -0.17) by this much and quantizes them
# unsigned, [0, 15]: all 16 levels on the side where the values are.
GELU_SHIFT = 0.171875
SMOOTHING_FORMS = ("smoothquant", "activation")  # max|x|^α / max|w|^(1-α), and max|x|^α
AUTHORS_ALPHAS: tuple[float | None, ...] = (None, *(round(0.05 * i, 2) for i in range(1, 20)))


@dataclass(frozen=True)
class SVDQuantConfig:
    """Settings of one SVDQuant run."""

    precision: str = "int4"  # "int4" or "nvfp4"
    rank: int = 32  # the paper's default; 16-256 are sensible, 0 disables the branch
    group_size: int = 64  # INT4 group along the input dim (weights and activations); NVFP4 uses 16
    # Migration strengths tried per layer and form; None is "no smoothing" (kept when smoothing
    # hurts). The authors' grid: 0.05 ... 0.95 in both forms (deepcompressor).
    alphas: tuple[float | None, ...] = AUTHORS_ALPHAS
    smoothing_forms: tuple[str, ...] = SMOOTHING_FORMS
    # Refinements of the winner's low-rank branch, L <- SVD_r(W - Q(W - L)); 1 is one SVD.
    low_rank_iterations: int = 100
    # One smoothing for each attention's q, k and v, as nunchaku's fused QKV projection has.
    fuse_qkv: bool = True
    # NVFP4 activations: an E4M3 scale per 16 only (nunchaku), or also one dynamic tensor scale.
    nvfp4_activation_tensor_scale: bool = False
    # The rank is capped at this share of the layer's smaller side, so that on tiny test models
    # the branch stays a small part of each layer; it never binds on full-size FLUX.1 (3072/8 =
    # 384) and binds on SD3.5 Medium only above rank 192.
    max_rank_fraction: float = 0.125
    svd: str = "auto"  # "exact" (torch.linalg.svd), "lowrank" (torch.svd_lowrank), "auto"
    sample_rows: int = 128  # calibration input rows kept per layer for the strength search
    per_image_group_size: int = 64  # W4A16 group of the per-image linears (nunchaku's AWQ: 64)
    # Per-image linears outside the blocks that stay 16-bit, as nunchaku keeps them: the final
    # norm's modulation and the timestep/guidance/text embedders ("" quantizes them W4A16 too).
    bf16_linears: str = r"norm_out\.linear|time_text_embed\..+"
    # Linears whose inputs are GELU outputs, quantized unsigned after a shift as nunchaku does
    # (INT4 only; "" quantizes every input signed).
    unsigned_inputs: str = r"(.+\.)?ff(_context)?\.net\.2"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.svd not in ("exact", "lowrank", "auto"):
            raise ValueError(f"svd must be 'exact', 'lowrank' or 'auto', got {self.svd!r}")
        if not self.alphas:
            raise ValueError("alphas must name at least one migration strength (None for no smoothing)")
        if not self.smoothing_forms or set(self.smoothing_forms) - set(SMOOTHING_FORMS):
            raise ValueError(f"smoothing_forms must be some of {SMOOTHING_FORMS}, got {self.smoothing_forms!r}")
        if self.low_rank_iterations < 1:
            raise ValueError(f"low_rank_iterations must be >= 1 (1: one SVD), got {self.low_rank_iterations}")

    def candidates(self) -> list[tuple[str | None, float | None]]:
        """The (form, α) pairs the strength search tries, "no smoothing" once as (None, None)."""
        found: list[tuple[str | None, float | None]] = [(None, None)] if None in self.alphas else []
        return found + [(form, a) for form in self.smoothing_forms for a in self.alphas if a is not None]

    def group_for(self, in_features: int) -> int:
        """The quantization group of a layer with ``in_features`` inputs."""
        if self.precision == "nvfp4":
            if in_features % NVFP4_BLOCK:
                raise ValueError(f"NVFP4 needs in_features divisible by {NVFP4_BLOCK}, got {in_features}")
            return NVFP4_BLOCK
        # Layers narrower than a group (tiny test models) use the largest common divisor.
        return math.gcd(in_features, self.group_size)

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The low-rank branch's rank for an (out, in) layer: ``rank`` under the size cap."""
        cap = max(1, int(min(out_features, in_features) * self.max_rank_fraction))
        return min(self.rank, cap)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "alphas": [a for a in self.alphas], "smoothing_forms": list(self.smoothing_forms)}


# quantgate's first recipe, before it followed the authors': SmoothQuant's form over 5 strengths,
# one SVD (the svdquant-ref-v1 scheme keeps it, to measure what the authors' recipe changes).
V1_RECIPE = {"alphas": (None, 0.3, 0.4, 0.5, 0.6, 0.7), "smoothing_forms": ("smoothquant",),
             "low_rank_iterations": 1, "bf16_linears": "", "unsigned_inputs": "", "fuse_qkv": False,
             "nvfp4_activation_tensor_scale": True}


# -- the pieces of the algorithm ----------------------------------------------------------------


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float | None,
                      form: str = "smoothquant") -> torch.Tensor:
    """Per-input-channel factors ``λ`` (float32, rounded to bf16 as they are stored).

    ``form`` "smoothquant": ``λ_j = max|x_j|^α / max_i |W_ij|^(1-α)``; "activation":
    ``λ_j = max|x_j|^α``. Channels never active or with a zero weight column keep ``λ = 1``.
    ``alpha=None`` means no smoothing (all ones).
    """
    in_features = weight.shape[1]
    if alpha is None:
        return torch.ones(in_features, dtype=torch.float32, device=weight.device)
    if form not in SMOOTHING_FORMS:
        raise ValueError(f"form must be one of {SMOOTHING_FORMS}, got {form!r}")
    a = act_absmax.float().to(weight.device)
    w = weight.float().abs().amax(dim=0)
    lam = a.clamp(min=1e-5).pow(alpha)
    if form == "smoothquant":
        lam = lam / w.clamp(min=1e-5).pow(1 - alpha)
    lam = torch.where((a > 0) & (w > 0), lam, torch.ones_like(lam)).clamp(1e-4, 1e4)
    return lam.to(torch.bfloat16).float()


def low_rank_split(weight: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation ``up @ down`` of ``weight`` (out, in), in float32.

    ``up`` (out, r) carries the singular values, ``down`` (r, in) the right singular vectors.
    ``exact`` is a full SVD; ``lowrank`` is torch's randomized SVD (fast on large layers);
    ``auto`` uses the randomized one on CUDA for layers whose smaller side exceeds 1024.
    """
    w = weight.float()
    out_features, in_features = w.shape
    rank = min(rank, out_features, in_features)
    if rank == 0:
        return w.new_zeros(out_features, 0), w.new_zeros(0, in_features)
    use_lowrank = method == "lowrank" or (method == "auto" and w.is_cuda and min(w.shape) > 1024)
    if use_lowrank:
        q = min(rank + 16, out_features, in_features)
        u, s, v = torch.svd_lowrank(w, q=q, niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    return u * s, vh.contiguous()


def fake_quantize_int4(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` rounded through signed INT4 with one absmax scale per row and group (same dtype)."""
    shape = x.shape
    g = x.reshape(-1, shape[-1] // group_size, group_size).float()
    scale = g.abs().amax(dim=-1, keepdim=True) / INT4_MAX
    q = torch.where(scale > 0, torch.round(g / scale.clamp(min=1e-30)), torch.zeros_like(g)).clamp(-INT4_MAX, INT4_MAX)
    return (q * scale).to(x.dtype).reshape(shape)


def quantize_int4_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed INT4 per (row, group) of ``group_size``: (packed uint8 (out, in/2), bf16 scales (out, groups)).

    Values are rounded against the bf16 scales that are stored, so dequantizing is exact.
    """
    spec = GroupSpec(bits=4, group_size=group_size, symmetric=True)
    _, scale, _ = quantize_rtn(weight, spec)
    scale = scale.to(torch.bfloat16)
    q = quantize_with(weight, expand_groups(scale.float(), weight.shape[1]), None, 4)
    return pack_int4(q), scale


def dequantize_int4_weight(packed: torch.Tensor, scales: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight from :func:`quantize_int4_weight`'s output, in ``dtype``."""
    q = unpack_int4(packed, signed=True)
    return q.to(dtype) * expand_groups(scales.to(dtype), q.shape[1])


def fake_quantize_uint4(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` (>= 0) rounded through unsigned INT4, [0, 15], one max scale per row and group."""
    shape = x.shape
    g = x.reshape(-1, shape[-1] // group_size, group_size).float().clamp(min=0)
    scale = g.amax(dim=-1, keepdim=True) / 15
    q = torch.where(scale > 0, torch.round(g / scale.clamp(min=1e-30)), torch.zeros_like(g)).clamp(0, 15)
    return (q * scale).to(x.dtype).reshape(shape)


def _fake_quantize_act(x: torch.Tensor, precision: str, group_size: int,
                       shift: torch.Tensor | None = None, nvfp4_tensor_scale: bool = False) -> torch.Tensor:
    """Activations through the 4-bit grid; with ``shift`` (INT4) ``x + shift`` unsigned, then back.
    NVFP4 activations take an E4M3 scale per 16 only, as nunchaku's (``nvfp4_tensor_scale`` adds
    one dynamic scale over the whole batch, quantgate's first recipe)."""
    if precision == "nvfp4":
        return fake_quantize_nvfp4(x, group_size, nvfp4_tensor_scale)
    if shift is not None:
        return fake_quantize_uint4(x + shift.to(x.dtype), group_size) - shift.to(x.dtype)
    return fake_quantize_int4(x, group_size)


# -- modules -----------------------------------------------------------------------------------


class SVDQuantLinear(nn.Module):
    """A linear layer as SVDQuant stores it: smoothing factors, a bf16 low-rank branch
    (``lora_down`` (r, in), ``lora_up`` (out, r)) and a packed 4-bit residual.

    The forward is a simulation (see the module docstring); ``low_rank = False`` skips the branch.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, precision: str, group_size: int,
                 bias: bool, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 unsigned_input: bool = False, act_tensor_scale: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.in_features, self.out_features = in_features, out_features
        # post-GELU inputs: shifted by GELU_SHIFT / λ (>= 0 after smoothing) and quantized unsigned
        self.unsigned_input = unsigned_input and precision == "int4"
        self.act_tensor_scale = act_tensor_scale and precision == "nvfp4"  # see _fake_quantize_act
        self.rank, self.precision, self.group_size = rank, precision, group_size
        self.low_rank = True
        self._base_branch: tuple[torch.Tensor, torch.Tensor, int] | None = None  # while LoRAs are applied
        kw = {"device": device}
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, **kw))
        self.register_buffer("lora_down", torch.zeros(rank, in_features, dtype=dtype, **kw))
        self.register_buffer("lora_up", torch.zeros(out_features, rank, dtype=dtype, **kw))
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        groups = in_features // group_size
        if precision == "nvfp4":
            from quantgate.quant.nvfp4 import fp8_dtype

            self.register_buffer("wscales", torch.zeros(out_features, groups, dtype=fp8_dtype(), **kw))
            self.register_buffer("wtscale", torch.ones(1, dtype=torch.float32, **kw))
        else:
            self.register_buffer("wscales", torch.zeros(out_features, groups, dtype=dtype, **kw))
            self.wtscale = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    def residual(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized 4-bit residual ``deq(R)`` (out, in)."""
        if self.precision == "nvfp4":
            codes = unpack_int4(self.qweight, signed=False)
            return dequantize_nvfp4(codes, self.wscales, self.wtscale).to(dtype)
        return dequantize_int4_weight(self.qweight, self.wscales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x / self.smooth.to(x.dtype)
        shift = GELU_SHIFT / self.smooth.float() if self.unsigned_input else None
        y = F.linear(_fake_quantize_act(xs, self.precision, self.group_size, shift, self.act_tensor_scale),
                     self.residual(x.dtype),
                     None if self.bias is None else self.bias.to(x.dtype))
        if self.low_rank and self.rank:
            y = y + F.linear(F.linear(xs, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return y

    def apply_loras(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take LoRA pairs ``(A (r_i, in), B (out, r_i))`` (``B`` already scaled by strength and
        alpha) into the low-rank branch, without touching the 4-bit residual (SVDQuant, section 4.4):
        ``lora_down' = [lora_down; A_1 diag(λ); ...]``, ``lora_up' = [lora_up, B_1, ...]``, so the
        branch adds ``sum_i B_i A_i x`` (``A`` times the smoothing factors ``λ``: the branch sees
        ``x / λ``). Recomputed from the original branch on every call; ``[]`` puts the original
        tensors back. The ``low_rank`` switch turns the LoRA off with the branch."""
        base = self._base_branch
        if base is None:
            if not pairs:
                return
            base = self._base_branch = (self.lora_down, self.lora_up, self.rank)
        down, up, rank = base
        if not pairs:
            self.lora_down, self.lora_up, self.rank = down, up, rank
            self._base_branch = None
            return
        smooth = self.smooth.float()
        extra_down = torch.cat([a.to(down.device, torch.float32) * smooth for a, _ in pairs])
        extra_up = torch.cat([b.to(up.device, torch.float32) for _, b in pairs], dim=1)
        self.lora_down = torch.cat([down, extra_down.to(down.dtype)])
        self.lora_up = torch.cat([up, extra_up.to(up.dtype)], dim=1)
        self.rank = rank + extra_down.shape[0]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"precision={self.precision}, group_size={self.group_size}, low_rank={self.low_rank}"
                + (", unsigned post-GELU input" if self.unsigned_input else ""))


class Int4WeightOnlyLinear(nn.Module):
    """W4A16: asymmetric INT4 weights per group (packed, bf16 scale, uint8 zero point), bf16 activations."""

    # No low-rank branch to fuse a LoRA into: quantgate.lora.native runs one beside it in bf16.
    lora_side_path = True

    def __init__(self, linear: nn.Linear, group_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = math.gcd(linear.in_features, group_size)
        spec = GroupSpec(bits=4, group_size=self.group_size, symmetric=False)
        weight = linear.weight.detach().float()
        _, scale, zero = quantize_rtn(weight, spec)
        scale = scale.to(torch.bfloat16)
        q = quantize_with(weight, expand_groups(scale.float(), self.in_features),
                          expand_groups(zero, self.in_features), 4)
        self.register_buffer("qweight", pack_int4(q))
        self.register_buffer("scales", scale)
        self.register_buffer("zeros", zero.to(torch.uint8))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    @classmethod
    def empty(cls, in_features: int, out_features: int, group_size: int, bias: bool) -> Int4WeightOnlyLinear:
        """A layer of this shape whose buffers a checkpoint fills (``quantgate.quant.svdquant_store``)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.group_size = in_features, out_features, group_size
        for name in ("qweight", "scales", "zeros"):
            layer.register_buffer(name, None)
        layer.register_buffer("bias", torch.empty(0) if bias else None)
        return layer

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight."""
        q = unpack_int4(self.qweight, signed=False).to(dtype)
        zero = expand_groups(self.zeros.to(dtype), self.in_features)
        return (q - zero) * expand_groups(self.scales.to(dtype), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only, "
                f"group {self.group_size}")


# -- quantizing one layer -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerResult:
    """What the strength search found for one layer."""

    alpha: float | None
    rank: int
    group_size: int
    output_error: float  # ||y - ŷ|| / ||y|| on the calibration sample (NaN without one)
    output_error_unsmoothed: float  # the same with alpha None (no smoothing)
    form: str | None = None  # the smoothing form of the winner (None: no smoothing)
    low_rank_iterations: int = 1  # SVDs of the kept branch: 1 + the refinements that helped
    output_error_one_svd: float = math.nan  # the winner's error before the refinement


def _dequantized_residual(r: torch.Tensor, precision: str, group: int) -> torch.Tensor:
    """What :func:`_quantize_residual` stores for ``r``, dequantized, without packing it: the search
    scores 39 candidates and up to 100 refinements per layer and keeps one. INT4 rounds each group
    against its bf16 scale in one grouped pass (bit for bit the stored values, tested)."""
    if precision == "nvfp4":
        return dequantize_nvfp4(*quantize_nvfp4(r, group))
    g = r.float().reshape(r.shape[0], -1, group)
    scale = (g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT4_MAX).to(torch.bfloat16).float()
    return (torch.round(g / scale).clamp(-INT4_MAX, INT4_MAX) * scale).reshape(r.shape)


def _quantize_residual(r: torch.Tensor, precision: str, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if precision == "nvfp4":
        codes, block_scale, tensor_scale = quantize_nvfp4(r, group)
        parts = {"qweight": pack_int4(codes.to(torch.int8)), "wscales": block_scale, "wtscale": tensor_scale}
        return parts, dequantize_nvfp4(codes, block_scale, tensor_scale)
    packed, scales = quantize_int4_weight(r, group)
    return {"qweight": packed, "wscales": scales}, dequantize_int4_weight(packed, scales)


def svdquant_linear(linear: nn.Linear, act_absmax: torch.Tensor | None, sample: torch.Tensor | None,
                    config: SVDQuantConfig, unsigned_input: bool = False) -> tuple[SVDQuantLinear, LayerResult]:
    """Quantize one ``nn.Linear`` with SVDQuant, searching the migration strength per layer.

    ``act_absmax`` is the calibration's largest |x| per input channel; ``sample`` (rows, in) a
    few real inputs of the layer on which each strength's output error is measured. Without a
    sample, the strength is the middle of the grid (SmoothQuant's 0.5 by default).
    ``unsigned_input``: the layer's inputs are GELU outputs, quantized unsigned (INT4 only).
    """
    ((module, result),) = svdquant_linears([linear], act_absmax, sample, config, unsigned_input)
    return module, result


def svdquant_linears(linears: Sequence[nn.Linear], act_absmax: torch.Tensor | None, sample: torch.Tensor | None,
                     config: SVDQuantConfig, unsigned_input: bool = False) -> list[tuple[SVDQuantLinear, LayerResult]]:
    """Quantize linears that read the same input (q, k and v) with one shared smoothing ``λ``, as
    nunchaku's fused QKV projection needs: each candidate's ``λ`` follows the rule over the
    stacked weights, and the candidate with the smallest error over all of their outputs wins.
    Each layer then gets its own branch, refined on its own output error. One linear is
    :func:`svdquant_linear`."""
    weights = [linear.weight.detach().float() for linear in linears]
    in_features = weights[0].shape[1]
    if any(w.shape[1] != in_features for w in weights):
        raise ValueError("linears smoothed together must read the same input width")
    device = weights[0].device
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    ranks = [config.rank_for(w.shape[0], in_features) for w in weights]
    group = config.group_for(in_features)
    candidates = config.candidates()
    if act_absmax is None:
        candidates = [(None, None)]
    x = None if sample is None or sample.numel() == 0 else sample.to(device=device, dtype=torch.float32)
    if x is None and len(candidates) > 1:  # nothing to measure on: SmoothQuant's middle strength
        smoothing = [c for c in candidates if c[1] is not None]
        middle = [c for c in smoothing if c == ("smoothquant", 0.5)] or smoothing[len(smoothing) // 2:][:1]
        candidates = middle or [(None, None)]
    ys = [None if x is None else x @ w.t() for w in weights]
    unsigned = unsigned_input and config.precision == "int4"

    def fit(i: int, w_hat: torch.Tensor, lam: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        """(squared error, squared norm, residual, dequantized residual) of layer ``i``'s branch ``up @ down``."""
        residual = w_hat - up.float() @ down.float()
        r_deq = _dequantized_residual(residual, config.precision, group)
        if x is None:  # no sample: the weight-space error of the fit
            target, estimate = w_hat, r_deq + up.float() @ down.float()
        else:
            xs = x / lam
            branch = (xs @ down.float().t()) @ up.float().t()
            shift = GELU_SHIFT / lam if unsigned else None
            acts = _fake_quantize_act(xs, config.precision, group, shift, config.nvfp4_activation_tensor_scale)
            target, estimate = ys[i], acts @ r_deq.t() + branch
        return (float(torch.linalg.vector_norm(target - estimate)) ** 2, float(torch.linalg.vector_norm(target)) ** 2,
                residual, r_deq)

    def relative(err_sq: float, norm_sq: float) -> float:
        return math.sqrt(err_sq / max(norm_sq, 1e-60))

    best = None
    unsmoothed = [math.nan] * len(weights)
    for form, alpha in candidates:
        lam = smoothing_factors(act_absmax if act_absmax is not None else torch.ones(in_features), stacked, alpha,
                                form or "smoothquant")
        layers = []
        for i, (w, rank) in enumerate(zip(weights, ranks, strict=True)):
            w_hat = w * lam
            up, down = (t.to(torch.bfloat16) for t in low_rank_split(w_hat, rank, config.svd))
            err_sq, norm_sq, residual, r_deq = fit(i, w_hat, lam, up, down)
            layers.append([err_sq, norm_sq, w_hat, up, down, residual, r_deq])
        error = relative(sum(v[0] for v in layers), sum(v[1] for v in layers)) if x is not None else math.nan
        if alpha is None:
            unsmoothed = [relative(v[0], v[1]) if x is not None else math.nan for v in layers]
        if best is None or error < best[0] or (math.isnan(best[0]) and not math.isnan(error)):
            best = (error, form, alpha, lam, layers)
    assert best is not None
    _, form, alpha, lam, layers = best
    results = []
    for i, (linear, rank, fitted) in enumerate(zip(linears, ranks, layers, strict=True)):
        err_sq, norm_sq, w_hat, up, down, residual, r_deq = fitted
        one_svd = relative(err_sq, norm_sq) if x is not None else math.nan
        # deepcompressor's refinement: the branch re-fit to what the 4-bit residual cannot hold
        score, iterations = err_sq, 1
        for _ in range(1, config.low_rank_iterations if rank else 1):
            up_new, down_new = (t.to(torch.bfloat16) for t in low_rank_split(w_hat - r_deq, rank, config.svd))
            score_new, _, residual_new, r_deq_new = fit(i, w_hat, lam, up_new, down_new)
            if not score_new < score:
                break
            score, up, down, residual, r_deq = score_new, up_new, down_new, residual_new, r_deq_new
            iterations += 1
        error = relative(score, norm_sq) if x is not None else math.nan
        parts, _ = _quantize_residual(residual, config.precision, group)  # only the kept fit is packed
        parts = {**parts, "smooth": lam.to(torch.bfloat16), "lora_down": down, "lora_up": up}
        out_features = linear.weight.shape[0]
        module = SVDQuantLinear(in_features, out_features, rank, config.precision, group, linear.bias is not None,
                                device=device, unsigned_input=unsigned_input,
                                act_tensor_scale=config.nvfp4_activation_tensor_scale)
        with torch.no_grad():
            for name, tensor in parts.items():
                getattr(module, name).copy_(tensor)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        results.append((module, LayerResult(alpha, rank, group, error, unsmoothed[i], form, iterations, one_svd)))
    return results


_QKV = re.compile(r"(?P<prefix>.+\.)(?:to_(?P<to>[qkv])|add_(?P<add>[qkv])_proj)")


def smoothing_groups(names: Sequence[str], fuse_qkv: bool) -> list[list[str]]:
    """``names`` in order, with each attention's q, k and v (and its context stream's
    add_q/k/v_proj) in one group when ``fuse_qkv``; every other linear alone."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        match = _QKV.fullmatch(name) if fuse_qkv else None
        key = (match["prefix"], "to" if match["to"] else "add") if match else (name, "")
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# -- calibration statistics -----------------------------------------------------------------------


class SmoothStats:
    """Largest |x| per input channel plus a reservoir sample of input rows (for the strength search).

    Each forward offers ``per_call`` random rows to a reservoir of ``capacity`` (Algorithm R),
    so the sample spreads evenly over prompts and timesteps. Deterministic for a seed.
    """

    kind = "svdquant"

    def __init__(self, in_features: int, device: torch.device | str = "cpu", capacity: int = 128,
                 per_call: int = 8, seed: int = 0):
        self.channels = ChannelAbsMax(in_features, device)
        self.sample = torch.zeros(capacity, in_features, dtype=torch.bfloat16, device=device)
        self.capacity, self.per_call = capacity, per_call
        self.filled = self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        # Never waits for the device: the running max is folded on the inputs' device, the
        # reservoir's draws come from a CPU generator, and rows are copied by Python-int index
        # (device-to-device). Index tensors built from Python lists would be host-to-device
        # copies, each a stream synchronization, for every layer at every forward.
        rows = x.detach().reshape(-1, x.shape[-1])
        self.channels.update(rows)
        if not self.capacity:
            return
        picks = torch.randperm(rows.shape[0], generator=self.generator)[: self.per_call].tolist()
        for row in picks:
            self.seen += 1
            if self.filled < self.capacity:
                slot, self.filled = self.filled, self.filled + 1
            else:
                slot = int(torch.randint(self.seen, (1,), generator=self.generator))
                if slot >= self.capacity:
                    continue
            # In draw order, so a slot drawn twice in one call keeps the later row (Algorithm R).
            self.sample[slot] = rows[row].to(torch.bfloat16)

    @property
    def absmax(self) -> torch.Tensor:
        return self.channels.absmax

    def state(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax, "sample": self.sample[: self.filled]}


def stats_factory(config: SVDQuantConfig, seed: int = 0):
    """An accumulator factory for ``calibration.collect``: one ``SmoothStats`` per layer, seeded by name."""
    def make(name: str, linear: nn.Linear) -> SmoothStats:
        return SmoothStats(linear.in_features, linear.weight.device, capacity=config.sample_rows,
                           seed=seed + zlib.crc32(name.encode()))
    return make


# -- the whole denoiser ---------------------------------------------------------------------------


def block_linears(model: nn.Module, per_image: str | None) -> dict[str, nn.Linear]:
    """The W4A4 targets: linears inside the repeated blocks (children that are ``nn.ModuleList``),
    except the per-image linears (full-match of the regex ``per_image``)."""
    lists = [name for name, child in model.named_children() if isinstance(child, nn.ModuleList)]
    pattern = re.compile(per_image) if per_image else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(name.startswith(f"{prefix}.") for prefix in lists)
            and not (pattern and pattern.fullmatch(name))}


def per_image_linears(model: nn.Module, per_image: str | None) -> dict[str, nn.Linear]:
    """The W4A16 targets: linears whose name fully matches the regex ``per_image``."""
    if not per_image:
        return {}
    pattern = re.compile(per_image)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(name)}


def w4a16_linears(model: nn.Module, per_image: str | None, config: SVDQuantConfig) -> dict[str, nn.Linear]:
    """The per-image linears that become W4A16: all but those ``config.bf16_linears`` keeps 16-bit."""
    keep = re.compile(config.bf16_linears) if config.bf16_linears else None
    return {n: m for n, m in per_image_linears(model, per_image).items() if not (keep and keep.fullmatch(n))}


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantize_model(model: nn.Module, stats: Mapping[str, Mapping[str, torch.Tensor]], config: SVDQuantConfig,
                   per_image: str | None, progress: bool = True) -> dict[str, Any]:
    """Replace ``model``'s linears in place, layer by layer: block linears by ``SVDQuantLinear``
    (with ``stats[name]`` = {"absmax", "sample"}), per-image linears by ``Int4WeightOnlyLinear``;
    every other linear (input/output embedders) stays bf16. Returns facts for the record."""
    # Names only: a 16-bit layer is freed as soon as its quantized replacement is in place, so
    # the model never holds both versions of more than one layer.
    targets = list(block_linears(model, per_image))
    w4a16 = list(w4a16_linears(model, per_image, config))
    unsigned = re.compile(config.unsigned_inputs) if config.unsigned_inputs else None
    results: dict[str, LayerResult] = {}
    with torch.no_grad(), tqdm(total=len(targets), desc="quantgate: svdquant", unit="linear",
                               disable=not progress) as bar:
        for names in smoothing_groups(targets, config.fuse_qkv):
            layer_stats = stats.get(names[0], {})  # q, k and v read the same input: the first one's rows
            quantized = svdquant_linears([model.get_submodule(n) for n in names], layer_stats.get("absmax"),
                                         layer_stats.get("sample"), config,
                                         bool(unsigned and unsigned.fullmatch(names[0])))
            for name, (module, result) in zip(names, quantized, strict=True):
                _replace(model, name, module)
                results[name] = result
            bar.update(len(names))
        for name in w4a16:
            _replace(model, name, Int4WeightOnlyLinear(model.get_submodule(name), config.per_image_group_size))
    untouched = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    errors = [r.output_error for r in results.values() if not math.isnan(r.output_error)]
    unsmoothed = [r.output_error_unsmoothed for r in results.values() if not math.isnan(r.output_error_unsmoothed)]
    return {
        "config": config.describe(),
        "w4a4_linears": len(results),
        "w4a16_linears": len(w4a16),
        "bf16_linears": untouched,
        "ranks": dict(Counter(r.rank for r in results.values())),
        "groups": dict(Counter(r.group_size for r in results.values())),
        "alpha_counts": {str(k): v for k, v in Counter(r.alpha for r in results.values()).items()},
        "form_counts": {str(k): v for k, v in Counter(r.form for r in results.values()).items()},
        "unsigned_input_linears": sum(bool(unsigned and unsigned.fullmatch(n)) for n in results),
        "mean_low_rank_iterations": (sum(r.low_rank_iterations for r in results.values()) / len(results)
                                     if results else None),
        "mean_layer_output_error_one_svd": (sum(e for e in (r.output_error_one_svd for r in results.values())
                                                if not math.isnan(e)) / len(errors)) if errors else None,
        "mean_layer_output_error": sum(errors) / len(errors) if errors else None,
        "mean_layer_output_error_unsmoothed": sum(unsmoothed) / len(unsmoothed) if unsmoothed else None,
    }


def storage_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model`` by role: the W4A4 layers' packed residual, scales, low-rank branch and
    smoothing factors, the W4A16 layers, and everything else (16-bit)."""
    parts = {"w4a4_residual": 0, "w4a4_scales": 0, "low_rank_branch": 0, "smoothing": 0, "w4a16": 0, "other": 0}
    role = {"qweight": "w4a4_residual", "wscales": "w4a4_scales", "wtscale": "w4a4_scales",
            "lora_down": "low_rank_branch", "lora_up": "low_rank_branch", "smooth": "smoothing"}
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is None:
                continue
            size = tensor.numel() * tensor.element_size()
            if isinstance(module, SVDQuantLinear):
                parts[role.get(name, "other")] += size
            elif isinstance(module, Int4WeightOnlyLinear):
                parts["w4a16"] += size if name != "bias" else 0
                parts["other"] += size if name == "bias" else 0
            else:
                parts["other"] += size
    return parts
