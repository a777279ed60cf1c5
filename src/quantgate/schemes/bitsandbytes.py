"""bitsandbytes through diffusers' own quantizer (``BitsAndBytesConfig``)."""

from __future__ import annotations

from quantgate.schemes.base import QuantizationPlan, QuantizationRequest, Requirements, Scheme


def _nf4(request: QuantizationRequest) -> QuantizationPlan:
    import torch
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

    # The configuration diffusers documents for FLUX: NF4 storage, bf16 compute, no double
    # quantization (so absmax stays fp32, one per 64 weights).
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return QuantizationPlan(PipelineQuantizationConfig(quant_mapping={name: config for name in request.components}))


SCHEMES = [
    Scheme(
        name="bnb-nf4",
        summary="bitsandbytes NF4 weights (blocks of 64, fp32 absmax), bf16 compute: the W4A16 baseline",
        backend="bitsandbytes",
        requires=Requirements(
            packages={"bitsandbytes": ">=0.45", "accelerate": ">=0.26"},
            devices=frozenset({"cuda"}),
            device_note="diffusers' bitsandbytes quantizer refuses to load without a GPU",
        ),
        plan=_nf4,
        markers=("bnb",),
        details={"config": "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                           "bnb_4bit_compute_dtype=torch.bfloat16)"},
    ),
]
