"""svdquant-ref: quantgate's own SVDQuant (W4A4 + rank-32 bf16 low-rank branch), any device.

Loaded as bf16 through diffusers, then calibrated and quantized in place (``post_load``), or
loaded from the quantized checkpoint an earlier run cached (``quantgate.quant.svdquant_store``):
the pipeline runs the calibration prompts over its timesteps while hooks fold every block
linear's inputs into per-channel absmax statistics and a small reservoir of real input rows
(cached on disk), then each block linear is smoothed, split into a bf16 low-rank branch and a
packed INT4 residual, layer by layer on the loading device (see ``quantgate.quant.svdquant``).
The per-image linears (adaLN modulation) become INT4 weight-only (W4A16, group 64), as in
nunchaku. The forward simulates W4A4 in bf16: a numerical reference with a real footprint,
not a fast kernel. LoRAs are concatenated into the low-rank branches (``lora_attach``), the
4-bit residuals stay as they are (``quantgate.lora.native``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from quantgate.quant.calibration import CalibrationSettings
from quantgate.quant.svdquant import V1_RECIPE, SVDQuantConfig
from quantgate.schemes.base import QuantizationPlan, QuantizationRequest, Scheme

# The CPU tier calibrates tiny models over a 4-step schedule: the same code over the same
# range of timesteps, without 40-50 steps of CFG per sample (minutes on two cores).
CPU_CALIBRATION_STEPS = 4


def calibration_for(request: QuantizationRequest) -> CalibrationSettings:
    """The request's calibration settings, with the step count capped on the CPU."""
    if request.calibration is None:
        raise ValueError("svdquant-ref calibrates on the pipeline and needs calibration settings "
                         "(QuantizationRequest.calibration); the pytest plugin passes them")
    settings = request.calibration
    steps = settings.call_kwargs.get("num_inference_steps")
    if request.device == "cpu" and isinstance(steps, int) and steps > CPU_CALIBRATION_STEPS:
        settings = replace(settings, call_kwargs={**settings.call_kwargs, "num_inference_steps": CPU_CALIBRATION_STEPS})
    return settings


def make_post_load(config: SVDQuantConfig):
    """The ``post_load`` step of an SVDQuant scheme with ``config``."""

    def post_load(pipe: Any, request: QuantizationRequest) -> dict[str, Any]:
        from quantgate.measure.memory import synchronize
        from quantgate.quant import svdquant_store
        from quantgate.quant.calibration import collect_cached
        from quantgate.quant.svdquant import (
            block_linears,
            quantize_model,
            stats_factory,
            storage_breakdown,
            w4a16_linears,
        )

        settings = calibration_for(request)
        notes: dict[str, Any] = {}
        for name in request.components:
            module = getattr(pipe, name)
            targets = block_linears(module, request.spec.per_image_linears)
            layers = [*targets, *w4a16_linears(module, request.spec.per_image_linears, config)]
            key = svdquant_store.checkpoint_key({**request.identity, "component": name}, config.describe(),
                                                settings.key_facts(), layers)
            directory = request.cache_dir / "quantized" / key if request.cache_dir is not None else None
            damaged = svdquant_store.problem(directory) if directory is not None and directory.exists() else None
            if directory is not None and directory.exists() and damaged is None:
                del targets
                start = time.perf_counter()
                result = dict(svdquant_store.load(directory, module, request.device))
                synchronize(request.device)
                result.update(checkpoint="hit", checkpoint_path=str(directory),
                              checkpoint_load_seconds=round(time.perf_counter() - start, 3))
            else:
                start = time.perf_counter()
                kind = f"svdquant-absmax-sample{config.sample_rows}"
                stats, facts = collect_cached(pipe, module, targets, stats_factory(config, settings.seed),
                                              kind, settings, {**request.identity, "component": name},
                                              request.cache_dir, desc=f"quantgate: svdquant calibration ({name})")
                del targets  # holds every 16-bit layer: quantize_model frees them one by one
                calibrated = time.perf_counter()
                result = quantize_model(module, stats, config, request.spec.per_image_linears)
                synchronize(request.device)
                result["calibration"] = {**facts, "steps": settings.call_kwargs.get("num_inference_steps"),
                                         "seconds": round(calibrated - start, 3)}
                result["quantize_seconds"] = round(time.perf_counter() - calibrated, 3)
                if directory is not None:
                    svdquant_store.save(directory, module, layers, result)
                result.update(checkpoint="miss" if directory is not None else "off",
                              **({"checkpoint_path": str(directory)} if directory is not None else {}),
                              **({"checkpoint_damaged": damaged} if damaged else {}))
            result["checkpoint_key"] = key
            result["storage_bytes"] = storage_breakdown(module)
            result["per_image_linears"] = {
                "pattern": request.spec.per_image_linears,
                "format": f"INT4 weight-only, asymmetric RTN, group {config.per_image_group_size}, bf16 activations",
                "why": "nunchaku keeps the adaLN modulation linears W4A16 (AWQ, group 64): one row per image",
                "kept_16bit": config.bf16_linears or None,
            }
            result["forward"] = ("simulated: residual dequantized and activations fake-quantized, bf16 matmul "
                                 "(a reference, not a fused W4A4 kernel)")
            notes[name] = result
        return notes

    return post_load


def _native_loras(pipe: Any, denoiser: str) -> Any:
    """LoRAs concatenated into each layer's low-rank branch, no re-quantization (the paper's section 4.4)."""
    from quantgate.lora.native import NativeLoras

    return NativeLoras(pipe, denoiser, "svdquant-ref")


DEFAULT = SVDQuantConfig()  # the authors' recipe (deepcompressor): 39 smoothing candidates, iterated branch
V1 = SVDQuantConfig(**V1_RECIPE)  # quantgate's first recipe, kept to measure what the authors' changes


def _svdquant_scheme(name: str, summary: str, config: SVDQuantConfig) -> Scheme:
    """A registry entry for quantgate's SVDQuant reference with ``config``; entries differ only in it."""
    return Scheme(
        name=name,
        summary=summary,
        backend="quantgate",
        plan=lambda request: QuantizationPlan(None),
        post_load=make_post_load(config),
        markers=("svdquant",),
        lora_attach=_native_loras,
        offline_quantization="SVDQuant checkpoints are calibrated and quantized once and shipped 4-bit "
                             "(nunchaku's FLUX.1 models); the 16 GB claim is about running them",
        details={"config": config.describe(),
                 "reference": "arXiv 2411.05007; forward simulated in bf16, footprint real (packed INT4)"},
    )


SCHEMES = [
    _svdquant_scheme("svdquant-ref", "quantgate's SVDQuant reference: smoothing + rank-32 bf16 low-rank branch + INT4 "
                     "W4A4 residual (group 64, packed); adaLN linears W4A16; simulated arithmetic, any device", DEFAULT),
    _svdquant_scheme("svdquant-ref-v1", "svdquant-ref with quantgate's first recipe: SmoothQuant-form smoothing over 5 "
                     "strengths and one SVD, against the authors' 39 candidates and iterated branch (to measure what "
                     "they change)", V1),
]

