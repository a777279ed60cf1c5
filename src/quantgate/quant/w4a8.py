"""W4A8 linear layers: packed 4-bit weights, activations quantized to INT8 per token at run time.

Storage (all registered buffers, so the footprint counts them): ``qweight`` uint8 (out, in/2)
holds two 4-bit codes per byte (``quantgate.quant.int4.pack_int4``, even column in the low
nibble); ``scale`` float32 (out, groups); ``zero`` uint8 (out, groups) for an asymmetric grid.
Codes are unsigned: an asymmetric weight is ``(code - zero) · scale``, a symmetric one
``(code - 8) · scale`` (its values -7..7 are stored shifted by 8). Either way ``code - zero``
lies in [-15, 15], so the weight expands to INT8 exactly.

Forward, by path (each call is counted in ``path_calls``):

- ``int8_gemm`` (CUDA, per-channel scales, more than 16 rows, both dims multiples of 8):
  ``torch._int_mm`` of the INT8 activations with the weight expanded to INT8 on the fly (the
  expansion is transient: the stored weight stays 4-bit), INT32 accumulation, then the
  per-token and per-channel scales. This is a real INT8 GEMM.
- ``dequant`` (CUDA otherwise): the activations are still quantized to INT8 and dequantized, the
  weight is dequantized to the activation dtype, and a bf16 GEMM runs. Two cases land here:
  rows <= 16 (``torch._int_mm`` refuses them; the per-image adaLN linears see one row per image)
  and grouped scales: with a scale per group along the input dimension the INT32 sum is no
  longer one dot product per output but one per group, so an INT8 GEMM would need one
  ``_int_mm`` per group plus as many rescaled INT32 (M, N) partial sums (12 for in=1536, 48 for
  6144): far more memory traffic than dequantizing the weight once. The numbers are the same
  W4A8 function up to bf16 rounding.
- ``simulated`` (any other device, the CPU tier): the same function in float32:
  dequantized INT8 activations times the dequantized 4-bit weight.
- ``triton`` (opt-in: ``QUANTGATE_W4A8_KERNEL=triton``): quantgate's own Triton kernels
  (:mod:`quantgate.quant.w4a8_triton`): a fused per-token quantizer, then one INT4 x INT8 GEMM
  that unpacks the weight in its loads, accumulates each group in INT32 and applies the scales
  and bias in its epilogue: any row count, per-channel or grouped scales. On CUDA it needs
  sm_80 or later; on the CPU it runs only under ``TRITON_INTERPRET=1`` (how the CPU tier checks
  it). It is not the default until a GPU run has timed it; where it cannot run, the layer takes
  the path it would have taken without it.

Checkpoints: ``save_layers``/``load_layers`` write and read every quantized layer's buffers in
one safetensors file next to a small JSON config.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantgate.quant.int4 import pack_int4
from quantgate.quant.sparse24 import quantize_rows

FORMAT = "quantgate-w4a8"
FORMAT_VERSION = 1
SYMMETRIC_OFFSET = 8  # a symmetric 4-bit value v in [-7, 7] is stored as the code v + 8
INT_MM_MIN_ROWS = 17  # torch._int_mm needs more than 16 rows on CUDA
KERNEL_ENV = "QUANTGATE_W4A8_KERNEL"
KERNELS = ("torch", "triton")


def kernel_choice() -> str:
    """The W4A8 kernel family asked for through ``QUANTGATE_W4A8_KERNEL`` (default "torch")."""
    choice = os.environ.get(KERNEL_ENV, "torch").strip().lower() or "torch"
    if choice not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: choose one of {', '.join(KERNELS)}")
    return choice


class W4A8Linear(nn.Module):
    """A linear layer with packed 4-bit weights and dynamic per-token INT8 activations."""

    def __init__(self, in_features: int, out_features: int, groups: int, symmetric: bool, *,
                 bias: bool = True, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if in_features % 2 or in_features % groups:
            raise ValueError(f"in_features {in_features} must be even and divisible into {groups} groups")
        self.in_features, self.out_features, self.groups, self.symmetric = in_features, out_features, groups, symmetric
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zero", None if symmetric else
                             torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.path_calls: Counter[str] = Counter()

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bias: torch.Tensor | None) -> W4A8Linear:
        """A layer from 4-bit integer values ``q`` (out, in) and per-(row, group) ``scale``/``zero``."""
        out_features, in_features = q.shape
        symmetric = zero is None
        layer = cls(in_features, out_features, scale.shape[1], symmetric, bias=bias is not None, device=q.device,
                    bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        codes = q.to(torch.int16) + (SYMMETRIC_OFFSET if symmetric else 0)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise ValueError("W4A8Linear holds 4-bit values: got codes outside [0, 15]")
        layer.qweight.copy_(pack_int4(codes))
        layer.scale.copy_(scale.float())
        if zero is not None:
            layer.zero.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    # -- weights ------------------------------------------------------------------------------

    def codes(self) -> torch.Tensor:
        """The unsigned 4-bit codes (out, in) as uint8."""
        packed = self.qweight
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(self.out_features, self.in_features)

    def int_weight(self) -> torch.Tensor:
        """``code - zero`` (out, in) as int8, in [-15, 15]; per-channel layers only for GEMM use."""
        codes = self.codes().to(torch.int8)
        if self.symmetric:
            return codes - SYMMETRIC_OFFSET
        zero = self.zero.to(torch.int8)
        if self.groups > 1:
            zero = zero.repeat_interleave(self.in_features // self.groups, dim=1)
        return codes - zero

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer represents, (out, in), in ``dtype``."""
        scale = self.scale.repeat_interleave(self.in_features // self.groups, dim=1) if self.groups > 1 else self.scale
        return (self.int_weight().float() * scale).to(dtype)

    # -- forward ------------------------------------------------------------------------------

    def path(self, rows: int, device: torch.device) -> str:
        """Which computation serves an input of ``rows`` rows on ``device`` (see the module doc)."""
        if kernel_choice() == "triton" and self.triton_serves(device):
            return "triton"
        if device.type != "cuda":
            return "simulated"
        if (self.groups == 1 and rows >= INT_MM_MIN_ROWS and self.in_features % 8 == 0
                and self.out_features % 8 == 0):
            return "int8_gemm"
        return "dequant"

    def triton_serves(self, device: torch.device | str) -> bool:
        """Whether the Triton kernels can serve this layer on ``device`` (asked for or not)."""
        from quantgate.quant import w4a8_triton

        return (w4a8_triton.unavailable(device) is None
                and w4a8_triton.unsupported_shape(self.in_features, self.out_features, self.groups) is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        path = self.path(rows.shape[0], rows.device)
        self.path_calls[path] += 1
        if path == "triton":
            y = self.forward_triton(rows)
        elif path == "int8_gemm":
            y = self.forward_int8(rows)
        elif path == "dequant":
            y = self.forward_dequant(rows)
        else:
            y = self.forward_simulated(rows)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_int8(self, rows: torch.Tensor) -> torch.Tensor:
        """INT8 x INT8 -> INT32 GEMM (``torch._int_mm``), then the token and channel scales (float32 out)."""
        if self.groups != 1:
            raise ValueError("the INT8 GEMM path needs one scale per output channel (group size = in_features)")
        q_x, x_scale = quantize_rows(rows)
        # (N, K) row-major transposed to (K, N): the column-major operand cuBLASLt's INT8 GEMM wants.
        acc = torch._int_mm(q_x, self.int_weight().t())
        y = acc.float().mul_(x_scale).mul_(self.scale.view(1, -1))
        if self.bias is not None:
            y = y.add_(self.bias.float())
        return y

    def forward_triton(self, rows: torch.Tensor) -> torch.Tensor:
        """The fused Triton quantizer and INT4 x INT8 GEMM (:mod:`quantgate.quant.w4a8_triton`)."""
        from quantgate.quant import w4a8_triton

        q_x, x_scale = w4a8_triton.quantize_rows(rows)
        out_dtype = rows.dtype if rows.dtype in (torch.bfloat16, torch.float16) else torch.float32
        return w4a8_triton.gemm(q_x, x_scale, self.qweight, self.scale, self.zero, self.bias, out_dtype)

    def forward_dequant(self, rows: torch.Tensor) -> torch.Tensor:
        """INT8-quantized activations and the 4-bit weight, both dequantized to the input dtype, one GEMM."""
        q_x, x_scale = quantize_rows(rows)
        x = (q_x.float() * x_scale).to(rows.dtype)
        return nn.functional.linear(x, self.dequantized_weight(rows.dtype), self.bias)

    def forward_simulated(self, rows: torch.Tensor) -> torch.Tensor:
        """The reference W4A8 function in float32 (any device)."""
        q_x, x_scale = quantize_rows(rows)
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(q_x.float() * x_scale, self.dequantized_weight(torch.float32), bias)

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        scales = "per-channel" if self.groups == 1 else f"group {self.in_features // self.groups}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, 4-bit {grid} {scales} weights, "
                "int8 per-token activations")


# -- swapping layers into a model ------------------------------------------------------------


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def path_counts(model: nn.Module) -> dict[str, int]:
    """How many W4A8 layer calls went down each path since the layers were made."""
    total: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, W4A8Linear):
            total.update(module.path_calls)
    return dict(total)


# -- checkpoints -----------------------------------------------------------------------------

TENSORS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantgate-w4a8.json"
_BUFFERS = ("qweight", "scale", "zero", "bias")


def save_layers(directory: str | Path, layers: Mapping[str, W4A8Linear], facts: Mapping[str, Any]) -> None:
    """Write ``layers`` into ``directory`` (which must exist): one safetensors file + a JSON config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors, config = {}, {}
    for name, layer in layers.items():
        for buffer in _BUFFERS:
            value = getattr(layer, buffer)
            if value is not None:
                tensors[f"{name}.{buffer}"] = value.detach().to("cpu").contiguous()
        config[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                        "groups": layer.groups, "symmetric": layer.symmetric, "bias": layer.bias is not None,
                        "bias_dtype": str(layer.bias.dtype).removeprefix("torch.") if layer.bias is not None else None}
    save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": FORMAT})
    document = {"format": FORMAT, "version": FORMAT_VERSION, "layers": config, **facts}
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def read_config(directory: str | Path) -> dict[str, Any] | None:
    """The JSON config of a saved checkpoint, or None if absent, unreadable or of another format."""
    path = Path(directory) / CONFIG_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if document.get("format") != FORMAT or document.get("version") != FORMAT_VERSION:
        return None
    return document


def load_layers(directory: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, W4A8Linear], dict]:
    """The layers saved in ``directory`` on ``device``, and the checkpoint's config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    document = read_config(directory)
    if document is None:
        raise ValueError(f"{directory} holds no {FORMAT} v{FORMAT_VERSION} checkpoint "
                         f"({CONFIG_FILE} missing or foreign)")
    tensors = load_file(str(directory / TENSORS_FILE), device=str(device))
    layers = {}
    for name, meta in document["layers"].items():
        bias_dtype = getattr(torch, meta["bias_dtype"]) if meta["bias_dtype"] else torch.bfloat16
        layer = W4A8Linear(meta["in_features"], meta["out_features"], meta["groups"], meta["symmetric"],
                           bias=meta["bias"], device="meta", bias_dtype=bias_dtype)
        for buffer in _BUFFERS:
            if getattr(layer, buffer) is not None:
                setattr(layer, buffer, tensors.pop(f"{name}.{buffer}"))
        layers[name] = layer
    if tensors:
        raise ValueError(f"{directory / TENSORS_FILE} holds tensors its config does not name: {sorted(tensors)[:5]}")
    return layers, document
