"""2:4 semi-structured sparsity with INT8 weights and dynamic INT8 activations (W8A8, 2:4).

torchao removed this path (``Int8DynamicActivationInt8WeightConfig`` with a semi-sparse
layout went with its version-1 configs), so quantgate carries it, following the recipe torchao
shipped: magnitude-prune every group of 4 input weights to 2, quantize the pruned weight
per output row to INT8, compress it for cuSPARSELt, and at run time quantize activations per
token to INT8 and multiply on sparse tensor cores with the per-row weight scales fused as
cuSPARSELt's alpha vector. ``Sparse24Int8Linear.reference`` computes the same function densely
(on any device) and is what the CPU tests check the math against.
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX = 127.0


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Zero the two smallest-magnitude weights of every group of 4 along the input dimension."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_features}")
    groups = weight.reshape(out_features, in_features // 4, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    return groups.scatter(-1, drop, 0).reshape(out_features, in_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row: (int8 values, fp32 scale per row) with x ~= values * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / INT8_MAX
    values = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scale


class Sparse24Int8Linear(nn.Module):
    """A linear layer with 2:4-sparse INT8 weights and dynamic per-token INT8 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = prune_2_4(linear.weight.detach())
        q_weight, scale = quantize_rows(weight)
        self.register_buffer("weight_scale", scale.flatten().contiguous())  # fp32 per output row
        if q_weight.is_cuda:
            # cuSPARSELt's compressed form: the kept half of the values plus their 2-bit indices.
            self.register_buffer("packed", torch._cslt_compress(q_weight))
            self.register_buffer("dense_int8", None)
        else:  # no sparse kernel off CUDA: keep the pruned int8 weight for the reference path
            self.register_buffer("packed", None)
            self.register_buffer("dense_int8", q_weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def reference(self, x: torch.Tensor, q_weight: torch.Tensor) -> torch.Tensor:
        """The layer's function computed densely: dequantized activations x dequantized weights."""
        q_x, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        y = (q_x.float() * x_scale) @ (q_weight.float() * self.weight_scale[:, None]).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.reference(x, self.dense_int8)
        rows = x.reshape(-1, self.in_features)
        # Row-major activations, passed as a transposed view: cuSPARSELt 0.8 serves int8 only
        # with the dense operand transposed ("operation not supported" otherwise). Elementwise
        # ops keep their input's strides, so a column-major input (the previous sparse layer's
        # transposed output) would otherwise reach the kernel untransposed.
        q_x, x_scale = quantize_rows(rows)
        q_x = q_x.contiguous()
        pad = (-q_x.shape[0]) % 16  # cuSPARSELt needs the dense operand's dims in multiples of 16
        if pad:
            q_x = torch.nn.functional.pad(q_x, (0, 0, 0, pad))
        y = torch._cslt_sparse_mm(self.packed, q_x.t(), alpha=self.weight_scale, out_dtype=torch.bfloat16).t()
        y = y[: rows.shape[0]] * x_scale.to(torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        # Hand the next layer a row-major tensor, as a dense linear would.
        return y.to(x.dtype).contiguous().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse int8"


def sparsify_linears(model: nn.Module, skip: str | None = None) -> list[str]:
    """Replace every eligible ``nn.Linear`` of ``model`` in place; return the replaced names.

    A linear is eligible when both dimensions are multiples of 32 (cuSPARSELt's INT8 tile) and
    its name does not fully match the regex ``skip``.
    """
    import re

    pattern = re.compile(skip) if skip else None
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or (pattern and pattern.fullmatch(full)):
                continue
            if child.in_features % 32 or child.out_features % 32:
                continue
            setattr(module, child_name, Sparse24Int8Linear(child))
            replaced.append(full)
    return replaced
