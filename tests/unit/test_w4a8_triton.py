"""quantgate's W4A8 Triton kernels (quantgate.quant.w4a8_triton) under Triton's CPU interpreter,
against the reference W4A8 path: the quantizer bit for bit, the GEMM exact in INT32 before any
scale and within float32 rounding after, and W4A8Linear taking the kernel when asked to.

The kernels run in a child process (tests/unit/triton_interpreted.py): TRITON_INTERPRET=1 must
be set before Triton is imported, and this process imported it with torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from quantgate.quant import w4a8_triton
from quantgate.quant.w4a8 import KERNEL_ENV, W4A8Linear, kernel_choice
from tests.conftest import REPO

pytest.importorskip("triton", reason="Triton is not installed: pip install -e '.[dev]' brings it")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    env.pop(KERNEL_ENV, None)
    done = subprocess.run([sys.executable, "-m", "tests.unit.triton_interpreted"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_quantizer_gives_the_reference_values_and_scales(interpreted):
    q = interpreted["quantizer"]
    assert q["values_equal"] and q["scales_equal"]
    # a scale of 1 and x.5 values: half to even, as torch.round
    assert q["ties"] == q["ties_reference"] == [127, 0, 2, 2, 0, -2, 4, -126]
    assert q["zero_row"] == 0  # an all-zero row: no division by zero, zeros out


def test_the_gemm_is_exact_in_int32_and_within_rounding_after_the_scales(interpreted):
    gemms = interpreted["gemms"]
    assert len(gemms) == 5
    per_channel = [g for g in gemms if g["shape"][3] == 1]
    assert len(per_channel) == 2 and all(g["int32_exact"] for g in per_channel)
    for g in gemms:  # float32 accumulation of INT32 group sums: a few float32 roundings of the peak
        assert g["fp32_max_error_over_peak"] < 2e-6, g
        assert g["bf16_within_one_step"], g


def test_w4a8linear_takes_the_kernel_when_asked_and_falls_back_where_it_cannot(interpreted):
    layer = interpreted["layer"]
    assert layer["paths"] == {"triton": 1} and layer["max_error_over_peak"] < 2e-6
    assert layer["odd_paths"] == {"simulated": 1}  # 48 inputs: no INT8 tile divides them


def test_the_kernel_choice_defaults_to_torch_and_refuses_unknown_names(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert kernel_choice() == "torch"
    monkeypatch.setenv(KERNEL_ENV, "Triton")
    assert kernel_choice() == "triton"
    monkeypatch.setenv(KERNEL_ENV, "cutlass")
    with pytest.raises(ValueError, match="QUANTGATE_W4A8_KERNEL='cutlass': choose one of torch, triton"):
        kernel_choice()


def test_where_the_kernels_cannot_run_they_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "need a CUDA GPU" in w4a8_triton.unavailable("cpu")
    assert "TRITON_INTERPRET=1" in w4a8_triton.unavailable("cpu")
    assert w4a8_triton.unsupported_shape(3072, 3072, 1) is None
    assert w4a8_triton.unsupported_shape(1536, 1536, 12) is None  # group 128
    assert "not a multiple of 32" in w4a8_triton.unsupported_shape(48, 8, 1)
    assert "not divisible" in w4a8_triton.unsupported_shape(100, 8, 3)
    # without the interpreter a CPU layer keeps its reference path even when the kernel is asked for
    monkeypatch.setenv(KERNEL_ENV, "triton")
    layer = W4A8Linear.from_quantized(torch.randint(0, 16, (8, 64)), torch.ones(8, 1), torch.zeros(8, 1), None)
    layer(torch.randn(2, 64))
    assert dict(layer.path_calls) == {"simulated": 1}


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "runs the Triton W4A8 kernels on the model's layer shapes: needs a CUDA GPU"
    return w4a8_triton.unavailable("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rows, outputs, inputs, group", [
    (4352, 3072, 3072, 3072),   # FLUX.1 attention projection, 4096 image + 256 text tokens, per channel
    (4352, 3072, 12288, 12288),  # FLUX.1 MLP down projection
    (4429, 1536, 1536, 128),     # SD3.5 Medium joint attention, gptq-w4a8-g128
    (1, 18432, 3072, 3072),      # a per-image adaLN linear: one row
], ids=["flux-attn", "flux-mlp-down", "sd35-g128", "adaln-1-row"])
def test_the_kernels_on_cuda_match_the_reference_on_model_shapes(rows, outputs, inputs, group, monkeypatch):
    if (why := _cuda_reason()) is not None:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(0)
    groups = inputs // group
    codes = torch.randint(0, 16, (outputs, inputs), device="cuda", generator=g)
    scale = torch.rand(outputs, groups, device="cuda", generator=g) * 0.02 + 0.001
    zero = torch.randint(0, 16, (outputs, groups), device="cuda", generator=g)
    bias = torch.randn(outputs, device="cuda", generator=g).to(torch.bfloat16)
    layer = W4A8Linear.from_quantized(codes, scale, zero, bias)
    x = torch.randn(rows, inputs, device="cuda", generator=g).to(torch.bfloat16)
    q_x, x_scale = w4a8_triton.quantize_rows(x)
    from quantgate.quant.sparse24 import quantize_rows

    q0, s0 = quantize_rows(x)
    # GPU float division may differ from torch's in the last bit: allow codes off by one, rarely
    assert torch.equal(x_scale, s0) and (q_x.int() - q0.int()).abs().max() <= 1
    assert (q_x != q0).float().mean() < 1e-4
    if groups == 1 and rows > 16:  # torch._int_mm: INT8 x INT8 -> INT32, exact
        raw = w4a8_triton.gemm(q0, s0, layer.qweight, layer.scale, layer.zero, None, raw_int32=True)
        assert torch.equal(raw, torch._int_mm(q0, layer.int_weight().t()))
    monkeypatch.setenv(KERNEL_ENV, "triton")
    out = layer(x)
    assert dict(layer.path_calls) == {"triton": 1}
    expected = layer.forward_simulated(x)
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0.01, atol=0.01)
