"""Where the Triton W4A8 kernels and the reference part on a CUDA GPU, shape by shape: the
quantizer's scales and codes, the raw INT32 sums, and the scaled output against a float64
evaluation of the same integers. Prints one JSON line per shape. Usage:
python tools/diag_w4a8_cuda.py (needs a CUDA GPU)."""

import json

import torch

from quantgate.quant import w4a8_triton
from quantgate.quant.sparse24 import quantize_rows
from quantgate.quant.w4a8 import W4A8Linear

SHAPES = [(4352, 3072, 3072, 3072), (4352, 3072, 12288, 12288), (4429, 1536, 1536, 128), (1, 18432, 3072, 3072)]


def diagnose(rows: int, outputs: int, inputs: int, group: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    groups = inputs // group
    codes = torch.randint(0, 16, (outputs, inputs), device="cuda", generator=g)
    scale = torch.rand(outputs, groups, device="cuda", generator=g) * 0.02 + 0.001
    zero = torch.randint(0, 16, (outputs, groups), device="cuda", generator=g)
    bias = torch.randn(outputs, device="cuda", generator=g).to(torch.bfloat16)
    layer = W4A8Linear.from_quantized(codes, scale, zero, bias)
    x = torch.randn(rows, inputs, device="cuda", generator=g).to(torch.bfloat16)
    q_x, x_scale = w4a8_triton.quantize_rows(x)
    q0, s0 = quantize_rows(x)
    report: dict = {"shape": [rows, outputs, inputs, group],
                    "scale_mismatches": int((x_scale != s0).sum()),
                    "scale_max_rel": float(((x_scale - s0).abs() / s0).max()),
                    "code_max_diff": int((q_x.int() - q0.int()).abs().max()),
                    "code_mismatch_rate": float((q_x != q0).float().mean())}
    if groups == 1 and rows > 16:
        raw = w4a8_triton.gemm(q0, s0, layer.qweight, layer.scale, layer.zero, None, raw_int32=True)
        ref = torch._int_mm(q0, layer.int_weight().t())
        report["int32_mismatches"] = int((raw != ref).sum())
        report["int32_max_diff"] = int((raw.long() - ref.long()).abs().max())
    out = w4a8_triton.gemm(q0, s0, layer.qweight, layer.scale, layer.zero, layer.bias).double()
    sim = layer.forward_simulated(x).double()
    exact = torch.nn.functional.linear(q0.double() * s0.double(), layer.dequantized_weight(torch.float64),
                                       layer.bias.double())
    for name, value in (("triton_bf16", out), ("simulated_fp32", sim)):
        err = (value - exact).abs()
        where = int(err.argmax())
        report[name] = {"max_abs": float(err.max()), "at_value": float(exact.flatten()[where]),
                        "max_over_peak": float(err.max() / exact.abs().max()),
                        "fails_1pct": int((err > 0.01 + 0.01 * exact.abs()).sum())}
    diff = (out - sim.bfloat16().double()).abs()
    report["test_assert_close_failures"] = int((diff > 0.01 + 0.01 * sim.bfloat16().double().abs()).sum())
    report["peak"] = float(exact.abs().max())
    return report


def main() -> None:
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "tf32": torch.backends.cuda.matmul.allow_tf32}))
    for shape in SHAPES:
        try:
            print(json.dumps(diagnose(*shape)), flush=True)
        except Exception as error:  # report and go on to the next shape
            print(json.dumps({"shape": shape, "error": repr(error)[:2000]}), flush=True)


if __name__ == "__main__":
    main()
