"""TorchAO schemes through diffusers' ``TorchAoConfig`` with torchao config objects.

Each entry names the torchao config it builds; adding a scheme is one more entry in
``SCHEMES``. torchao is imported only when a scheme is planned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quantgate.schemes.base import QuantizationPlan, QuantizationRequest, Requirements, Scheme

_TORCHAO = {"torchao": ">=0.15"}
_FP8 = Requirements(packages=_TORCHAO, devices=frozenset({"cuda"}), min_capability=(8, 9),
                    device_note="float8 matmuls run on FP8 tensor cores",
                    capability_note="FP8 tensor cores start with Ada, sm_89")
_TINYGEMM = Requirements(packages=_TORCHAO, devices=frozenset({"cuda"}), min_capability=(8, 0),
                         device_note="the tile_packed_to_4d int4 kernel (tinygemm) is CUDA-only",
                         capability_note="tinygemm needs bf16 tensor cores, sm_80 or newer")

# torch._int_mm (INT8 x INT8 -> INT32 on tensor cores) needs more than 16 rows. A denoiser's
# per-image linears (adaLN modulation, timestep/text embedders) see one row per image, so under
# torch.compile INT8 dynamic activation fails on them at batch <= 16 (and in eager mode torchao
# falls back to an fp32 matmul). Those layers are GEMV-shaped: int8 weight-only serves them.
_PER_IMAGE_WHY = ("torch._int_mm needs more than 16 rows and these linears see one row per image; "
                  "they keep int8 weights with bf16 activations (Int8WeightOnlyConfig)")

AoFactory = Callable[[Any], Any]  # torchao.quantization module -> an AOBaseConfig


def _plan(main: AoFactory, per_image: AoFactory | None) -> Callable[[QuantizationRequest], QuantizationPlan]:
    def plan(request: QuantizationRequest) -> QuantizationPlan:
        import torchao.quantization as tq
        from diffusers import PipelineQuantizationConfig, TorchAoConfig

        config, notes = main(tq), {}
        if per_image is not None:
            config = tq.FqnToConfig({f"re:{request.spec.per_image_linears}": per_image(tq), "_default": config})
            notes = {"per_image_linears": {"pattern": request.spec.per_image_linears,
                                           "config": type(per_image(tq)).__name__, "why": _PER_IMAGE_WHY}}
        mapping = {name: TorchAoConfig(config) for name in request.components}
        return QuantizationPlan(PipelineQuantizationConfig(quant_mapping=mapping), notes)

    return plan


def _entry(name: str, summary: str, config: str, main: AoFactory, *, per_image: AoFactory | None = None,
           requires: Requirements | None = None) -> Scheme:
    return Scheme(
        name=name,
        summary=summary,
        backend="torchao",
        requires=requires or Requirements(packages=_TORCHAO),
        plan=_plan(main, per_image),
        markers=("torchao",),
        details={"config": f"TorchAoConfig({config})",
                 # peft's torchao merge re-applies the config per layer, which FqnToConfig refuses
                 **({"lora_fuse_unsupported": "peft re-quantizes a fused layer with the scheme's config, and "
                                              "torchao refuses a filter_fn beside FqnToConfig"} if per_image else {})},
    )


SCHEMES = [
    _entry("int8-wo", "int8 weights (per-row scales), bf16 activations",
           "Int8WeightOnlyConfig()", lambda tq: tq.Int8WeightOnlyConfig()),
    _entry("int8-dq", "int8 weights and per-token dynamic int8 activations; per-image linears int8 weight-only",
           "FqnToConfig({per-image linears: Int8WeightOnlyConfig(), _default: Int8DynamicActivationInt8WeightConfig()})",
           lambda tq: tq.Int8DynamicActivationInt8WeightConfig(), per_image=lambda tq: tq.Int8WeightOnlyConfig()),
    _entry("fp8-row", "float8 e4m3 weights and dynamic activations, per-row scales: TorchAO's primary FLUX target",
           "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())",
           lambda tq: tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow()), requires=_FP8),
    _entry("fp8-tensor", "float8 e4m3 weights and dynamic activations, one scale per tensor",
           "Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())",
           lambda tq: tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerTensor()), requires=_FP8),
    # The default int4 packing needs the separate `mslk` kernels package; tile_packed_to_4d
    # (tinygemm, in torch itself) needs nothing extra.
    _entry("int4-wo", "int4 weights (groups of 128, tile_packed_to_4d / tinygemm), bf16 activations",
           "Int4WeightOnlyConfig(group_size=128, int4_packing_format='tile_packed_to_4d')",
           lambda tq: tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
           requires=_TINYGEMM),
]
