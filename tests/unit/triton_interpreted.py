"""Runs quantgate's W4A8 Triton kernels under Triton's CPU interpreter and prints what they
computed against the reference path, as JSON (read by tests/unit/test_w4a8_triton.py).

It is a separate process because ``TRITON_INTERPRET=1`` must be set before anything imports
Triton (its library functions are compiled for the mode at import), and the pytest process has
imported it long before any test runs (torch and diffusers do). Usage:
``TRITON_INTERPRET=1 python -m tests.unit.triton_interpreted``.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: these checks run Triton's interpreter")

import torch  # noqa: E402

from quantgate.quant import w4a8_triton  # noqa: E402
from quantgate.quant.sparse24 import quantize_rows  # noqa: E402
from quantgate.quant.w4a8 import KERNEL_ENV, W4A8Linear  # noqa: E402

# (rows, outputs, inputs, groups, symmetric): rows and outputs off the 16-wide tiles on purpose;
# group sizes 256, 64, 32 and 128.
SHAPES = [(37, 40, 256, 1, False), (5, 48, 256, 1, True), (1, 24, 256, 4, False), (19, 32, 256, 8, True),
          (33, 16, 384, 3, False)]


def _layer(outputs: int, inputs: int, groups: int, symmetric: bool, seed: int) -> W4A8Linear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (outputs, inputs), generator=g)
    scale = torch.rand(outputs, groups, generator=g) * 0.02 + 0.001
    zero = None if symmetric else torch.randint(0, 16, (outputs, groups), generator=g)
    bias = torch.randn(outputs, generator=g).to(torch.bfloat16)
    return W4A8Linear.from_quantized(codes - 8 if symmetric else codes, scale, zero, bias)


def quantizer() -> dict:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 300, generator=g) * 4).to(torch.bfloat16)
    q, s = w4a8_triton.quantize_rows(x)
    q0, s0 = quantize_rows(x)
    # ties: with a row maximum of 127 the scale is 1, so x.5 values must round half to even
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]])
    tq, _ = w4a8_triton.quantize_rows(ties)
    return {"values_equal": torch.equal(q, q0), "scales_equal": torch.equal(s, s0),
            "ties": tq.flatten().tolist(), "ties_reference": quantize_rows(ties)[0].flatten().tolist(),
            "zero_row": w4a8_triton.quantize_rows(torch.zeros(1, 64))[0].abs().sum().item()}


def gemms() -> list[dict]:
    results = []
    for i, (rows, outputs, inputs, groups, symmetric) in enumerate(SHAPES):
        layer = _layer(outputs, inputs, groups, symmetric, seed=10 + i)
        x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(20 + i)) * 2
        q_x, x_scale = quantize_rows(x)
        entry = {"shape": [rows, outputs, inputs, groups, symmetric]}
        if groups == 1:
            raw = w4a8_triton.gemm(q_x, x_scale, layer.qweight, layer.scale, layer.zero, None, raw_int32=True)
            entry["int32_exact"] = torch.equal(raw, q_x.int() @ layer.int_weight().int().t())
        reference = layer.forward_simulated(x)
        y32 = w4a8_triton.gemm(q_x, x_scale, layer.qweight, layer.scale, layer.zero, layer.bias, torch.float32)
        y16 = w4a8_triton.gemm(q_x, x_scale, layer.qweight, layer.scale, layer.zero, layer.bias, torch.bfloat16)
        peak = reference.abs().max().item()
        entry["fp32_max_error_over_peak"] = (y32 - reference).abs().max().item() / peak
        # bf16 output: within one bf16 step of the float32 result (2^-7 relative; Triton's
        # interpreter truncates float32 to bf16 where a GPU rounds to nearest, half that), plus fp32 noise
        entry["bf16_within_one_step"] = bool(((y16.float() - reference).abs()
                                              <= reference.abs() * 2.0 ** -7 + 1e-5 * peak).all())
        results.append(entry)
    return results


def layer_path() -> dict:
    os.environ[KERNEL_ENV] = "triton"
    layer = _layer(32, 256, 2, False, seed=3)
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    reference = layer.forward_simulated(x.reshape(-1, 256)).reshape(2, 9, 32)
    odd = W4A8Linear.from_quantized(torch.randint(0, 16, (8, 48)), torch.ones(8, 1), torch.zeros(8, 1), None)
    odd(torch.randn(3, 48))  # 48 inputs: no INT8 tile divides them, so the reference path serves it
    return {"paths": dict(layer.path_calls), "max_error_over_peak": ((y - reference).abs().max()
                                                                    / reference.abs().max()).item(),
            "odd_paths": dict(odd.path_calls)}


if __name__ == "__main__":
    print(json.dumps({"quantizer": quantizer(), "gemms": gemms(), "layer": layer_path()}))
