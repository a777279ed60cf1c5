"""quantgate's own W4A8: 4-bit weights by GPTQ (or round-to-nearest, its baseline), INT8 activations.

Loaded as bf16 through diffusers, then transformed in place (``quantgate.quant.w4a8_model``):
the linears of the transformer blocks become ``W4A8Linear`` (packed 4-bit weights, dynamic
per-token INT8 activations, a real INT8 GEMM on CUDA where shapes allow); the embedders and
final layers stay bf16. GPTQ calibrates on the pipeline itself (``--quantgate-calibration-*``
options) and both methods cache their quantized checkpoint, so a second run loads it.
``rtn-w4a8`` uses the very same grid and layers, so the difference between the two is GPTQ's gain.
"""

from __future__ import annotations

from typing import Any

from quantgate.quant.gptq import GPTQConfig
from quantgate.quant.int4 import GroupSpec
from quantgate.schemes.base import QuantizationPlan, QuantizationRequest, Requirements, Scheme

PER_CHANNEL = GroupSpec(bits=4, group_size=None, symmetric=False)
GROUP_128 = GroupSpec(bits=4, group_size=128, symmetric=False)


def _post_load(method_name: str, config: GPTQConfig):
    def post_load(pipe: Any, request: QuantizationRequest) -> dict[str, Any]:
        from quantgate.quant.w4a8_model import W4A8Method, quantize_denoiser

        method = W4A8Method(method_name, config)
        return {name: quantize_denoiser(pipe, name, method, identity=request.identity, cache_dir=request.cache_dir,
                                        settings=request.calibration, per_image=request.spec.per_image_linears)
                for name in request.components}

    return post_load


# The CPU tier runs tiny configs whose linears have at most 128 inputs: groups of 128 are one
# group per row there, so the grouped schemes would only repeat the per-channel ones. Grouped
# layers are exercised on the CPU by tests/unit/test_w4a8.py and test_gptq.py.
_GROUPED = Requirements(devices=frozenset({"cuda"}),
                        device_note="groups of 128 need full-size layers; the CPU tier's tiny linears have at "
                                    "most 128 inputs, where a group of 128 is per-channel: the per-channel schemes "
                                    "cover that")


def _entry(name: str, method: str, config: GPTQConfig, summary: str, baseline: str | None = None) -> Scheme:
    spec = config.spec
    grid = f"{'a' if not spec.symmetric else ''}symmetric, " + (
        "per-channel" if spec.group_size is None else f"group {spec.group_size}")
    how = (f"GPTQ (block {config.block_size}, damp {config.damp}, act-order {config.act_order})"
           if method == "gptq" else "round-to-nearest")
    return Scheme(
        name=name,
        summary=summary,
        backend="quantgate",
        # the CPU runs the same function simulated in float32
        requires=_GROUPED if config.spec.group_size else Requirements(),
        plan=lambda request: QuantizationPlan(None),
        post_load=_post_load(method, config),
        markers=("gptq",),
        lora_unsupported="its block linears are quantgate's W4A8Linear, for which peft has no LoRA layer",
        details={"config": f"transformer-block linears: 4-bit {grid} weights by {how}, packed; dynamic per-token "
                           "int8 activations; torch._int_mm where rows > 16 and per-channel scales, else dequantized "
                           "(recorded per layer group); embedders and final layers bf16",
                 "calibrates": method == "gptq",
                 # the round-to-nearest scheme on the same grid, which GPTQ's output error is gated against
                 **({"rtn_baseline": baseline} if baseline else {})},
    )


SCHEMES = [
    _entry("rtn-w4a8", "rtn", GPTQConfig(spec=PER_CHANNEL),
           "round-to-nearest 4-bit weights (per-channel, asymmetric) + dynamic int8 activations: GPTQ's baseline"),
    _entry("rtn-w4a8-g128", "rtn", GPTQConfig(spec=GROUP_128),
           "round-to-nearest 4-bit weights in groups of 128 (asymmetric) + dynamic int8 activations"),
    _entry("gptq-w4a8", "gptq", GPTQConfig(spec=PER_CHANNEL),
           "GPTQ 4-bit weights (per-channel, asymmetric, act-order) + dynamic int8 activations, int8 GEMM on CUDA",
           baseline="rtn-w4a8"),
    _entry("gptq-w4a8-g128", "gptq", GPTQConfig(spec=GROUP_128),
           "GPTQ 4-bit weights in groups of 128 (asymmetric, act-order, static groups) + dynamic int8 activations",
           baseline="rtn-w4a8-g128"),
]
