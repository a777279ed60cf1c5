"""Diagnostics for the W4A8 linear on a GPU: where its time goes, layer shape by layer shape.

For SD3.5 Medium's linear shapes at 1024px with CFG (8192 image rows, 666 text rows, 2 rows
for the adaLN linears), times with CUDA events: bf16 ``F.linear``; the W4A8 layer on each of
its paths; and its parts (per-token INT8 quantization of the activations, expansion of the
4-bit weight to INT8, the bare ``torch._int_mm``); quantgate's Triton kernels
(``quantgate.quant.w4a8_triton``: the fused quantizer, the INT4 x INT8 GEMM per channel and with
128-wide groups) and their TFLOP/s against the INT8 dense rate measured here (``torch._int_mm``
at 8192^3). FLUX.1's shapes (4096 image + 256 text rows at 1024px, batch 1) follow SD3.5's. Also
checks each path against the float32 reference. Usage: python tools/probe_w4a8.py  (prints a
table; needs a CUDA GPU).
"""

import statistics

import torch

from quantgate.measure.timing import cuda_event_times
from quantgate.quant import w4a8_triton
from quantgate.quant.gptq import rtn_quantize
from quantgate.quant.int4 import GroupSpec
from quantgate.quant.sparse24 import quantize_rows
from quantgate.quant.w4a8 import W4A8Linear

# (name, rows, in_features, out_features)
SHAPES = [
    ("attn.to_q (image)", 8192, 1536, 1536),
    ("ff.net.0.proj (image)", 8192, 1536, 6144),
    ("ff.net.2 (image)", 8192, 6144, 1536),
    ("attn.add_q_proj (text)", 666, 1536, 1536),
    ("norm1.linear (adaLN)", 2, 1536, 13824),
    ("flux attn.to_q", 4352, 3072, 3072),
    ("flux ff.net.0.proj", 4096, 3072, 12288),
    ("flux ff.net.2", 4096, 12288, 3072),
    ("flux single proj_mlp", 4352, 3072, 12288),
    ("flux norm1.linear", 1, 3072, 18432),
]


def ms(fn, rounds=20):
    """Median milliseconds per call."""
    return statistics.median(cuda_event_times(fn, "cuda", rounds=rounds, warmup_rounds=3)) * 1e3


def probe(rows: int, k: int, n: int) -> tuple[dict[str, float], list[str]]:
    """Times (ms) of each computation for one shape, and the relative errors of the two GPU paths."""
    linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    channel = rtn_quantize(linear.weight, GroupSpec(4, None, False))
    grouped = rtn_quantize(linear.weight, GroupSpec(4, 128, False))
    layer = W4A8Linear.from_quantized(channel.q, channel.scale, channel.zero, linear.bias)
    layer_g = W4A8Linear.from_quantized(grouped.q, grouped.scale, grouped.zero, linear.bias)
    q_x, _ = quantize_rows(x)
    w8 = layer.int_weight()
    gemm = rows >= 17  # torch._int_mm needs more than 16 rows
    nan = float("nan")
    with torch.inference_mode():
        times = {
            "bf16": ms(lambda: linear(x)),
            "int8_gemm": ms(lambda: layer.forward_int8(x)) if gemm else nan,
            "dequant": ms(lambda: layer.forward_dequant(x)),
            "dequant g128": ms(lambda: layer_g.forward_dequant(x)),
            "quant x": ms(lambda: quantize_rows(x)),
            "w->int8": ms(layer.int_weight),
            "_int_mm": ms(lambda: torch._int_mm(q_x, w8.t())) if gemm else nan,
            "triton": ms(lambda: layer.forward_triton(x)),
            "triton g128": ms(lambda: layer_g.forward_triton(x)),
            "triton q x": ms(lambda: w4a8_triton.quantize_rows(x)),
        }
        ref = layer.forward_simulated(x)
        paths = ([layer.forward_int8, layer.forward_dequant] if gemm else [layer.forward_dequant]) + [
            layer.forward_triton]
        errors = [f"{((path(x).float() - ref).norm() / ref.norm()).item():.1e}" for path in paths]
    return times, errors


def main():
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
    torch.manual_seed(0)
    if (why := w4a8_triton.unavailable("cuda")) is not None:
        raise SystemExit(why)
    big = torch.randint(-127, 128, (8192, 8192), device="cuda", dtype=torch.int8)
    peak = 2 * 8192**3 / (ms(lambda: torch._int_mm(big, big.t())) / 1e3) / 1e12
    print(f"INT8 dense rate (torch._int_mm, 8192^3): {peak:.0f} TOP/s")
    columns = ("bf16", "int8_gemm", "dequant", "dequant g128", "quant x", "w->int8", "_int_mm", "triton",
               "triton g128", "triton q x")
    print(f"{'shape (ms)':24s} {'rows':>5s} " + " ".join(f"{c:>12s}" for c in columns)
          + "  triton TOP/s (% of INT8 dense)  rel. error of [int8_gemm /] dequant / triton vs fp32")
    for name, rows, k, n in SHAPES:
        times, errors = probe(rows, k, n)
        rate = 2 * rows * k * n / (times["triton"] / 1e3) / 1e12
        print(f"{name:24s} {rows:5d} " + " ".join(f"{times[c]:12.3f}" for c in columns)
              + f"  {rate:7.1f} ({rate / peak:5.1%})  " + " / ".join(errors))


if __name__ == "__main__":
    main()
