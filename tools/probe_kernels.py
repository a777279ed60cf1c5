"""Diagnostics run on a GPU machine: which cuSPARSELt INT8 call forms this torch build accepts,
and how one FLUX single-stream block fares in bf16 vs float8 row-wise, eager vs compiled.
Usage: python tools/probe_kernels.py  (prints a table; needs a CUDA GPU)."""

import statistics

import torch

from quantgate.measure.timing import cuda_event_times


def cuda_time(fn, rounds=10):
    """Median milliseconds per call, through the suite's own CUDA-event loop."""
    return statistics.median(cuda_event_times(fn, "cuda", rounds=rounds, warmup_rounds=3)) * 1e3


def probe_cusparselt():
    print("cuSPARSELt available:", torch.backends.cusparselt.is_available(),
          "version:", getattr(torch.backends.cusparselt, "version", lambda: None)())
    from quantgate.quant.sparse24 import prune_2_4, quantize_rows
    for n, k, m in [(128, 256, 160), (3072, 12288, 4352)]:
        w, _ = quantize_rows(prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)))
        packed = torch._cslt_compress(w)
        x, _ = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        alpha = torch.rand(n, device="cuda", dtype=torch.float32)
        for b_name, b in [("x.t() (transposed view)", x.t()), ("x.t().contiguous()", x.t().contiguous())]:
            for out_dtype in (torch.bfloat16, torch.int32, torch.int8, None):
                for use_alpha in (True, False):
                    try:
                        y = torch._cslt_sparse_mm(packed, b, alpha=alpha if use_alpha else None, out_dtype=out_dtype)
                        torch.cuda.synchronize()
                        status = f"ok {tuple(y.shape)} {y.dtype}"
                    except Exception as exc:  # report every form, working or not
                        status = f"FAIL {str(exc).splitlines()[0][:90]}"
                    print(f"  {n}x{k} @ ({b_name}, m={m}) out={out_dtype} alpha={use_alpha}: {status}")


def probe_fp8_block():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch.manual_seed(0)
    tokens = 4096 + 256
    x = torch.randn(1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 256, 3072, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16)
    rope = (torch.randn(tokens, 128, device="cuda"), torch.randn(tokens, 128, device="cuda"))
    results = {}
    for scheme in ("bf16", "fp8-row"):
        for mode in ("eager", "compile", "compile max-autotune-no-cudagraphs"):
            with torch.device("cuda"):
                block = FluxSingleTransformerBlock(3072, 24, 128).to(torch.bfloat16).eval()
            if scheme == "fp8-row":
                quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            if mode != "eager":
                block.compile(dynamic=False, **({"mode": "max-autotune-no-cudagraphs"} if "autotune" in mode else {}))
            with torch.inference_mode():
                try:
                    ms = cuda_time(lambda block=block: block(x, ctx, temb, image_rotary_emb=rope))
                except Exception as exc:
                    ms = f"FAIL {str(exc).splitlines()[0][:80]}"
            results[(scheme, mode)] = ms
            print(f"  single block, {tokens} tokens, {scheme:8s} {mode:36s} {ms if isinstance(ms, str) else f'{ms:.3f} ms'}")
            torch._dynamo.reset()


if __name__ == "__main__":
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
    probe_cusparselt()
    probe_fp8_block()
