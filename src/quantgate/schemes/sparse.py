"""2:4 semi-structured sparsity + INT8 (quantgate's own kernel wrapper over cuSPARSELt).

Loaded as bf16 through diffusers, then transformed in place: every eligible linear of the
denoiser becomes 2:4-sparse W8A8 (see ``quantgate.quant.sparse24``); the per-image linears
(one row per image, where a sparse GEMM cannot pay off) get torchao int8 weight-only instead.
Pruning random or real weights to 2:4 without fine-tuning changes the model: this scheme
measures speed and memory; its quality is expected to drop and is gated separately.
"""

from __future__ import annotations

import re
from typing import Any

from quantgate.schemes.base import QuantizationPlan, QuantizationRequest, Requirements, Scheme


def _post_load(pipe: Any, request: QuantizationRequest) -> dict[str, Any]:
    import torch

    if not torch.backends.cusparselt.is_available():
        raise RuntimeError("sparse24-int8-dq needs cuSPARSELt, which this torch build does not provide "
                           "(torch.backends.cusparselt.is_available() is False)")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from quantgate.quant.sparse24 import sparsify_linears

    notes: dict[str, Any] = {}
    pattern = re.compile(request.spec.per_image_linears)
    for name in request.components:
        module = getattr(pipe, name)
        replaced = sparsify_linears(module, skip=request.spec.per_image_linears)
        quantize_(module, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and bool(pattern.fullmatch(fqn)))
        notes[name] = {"sparse24_int8_linears": len(replaced),
                       "per_image_linears": {"pattern": request.spec.per_image_linears,
                                             "config": "Int8WeightOnlyConfig",
                                             "why": "one row per image: a sparse GEMM cannot pay off on a GEMV"}}
    return notes


SCHEMES = [
    Scheme(
        name="sparse24-int8-dq",
        summary="2:4 magnitude-pruned int8 weights, dynamic per-token int8 activations, cuSPARSELt sparse tensor cores",
        backend="quantgate",
        requires=Requirements(packages={"torchao": ">=0.15"}, devices=frozenset({"cuda"}), min_capability=(8, 0),
                              device_note="2:4 sparse tensor cores via cuSPARSELt",
                              capability_note="sparse tensor cores start with Ampere, sm_80"),
        plan=lambda request: QuantizationPlan(None),
        post_load=_post_load,
        markers=("sparse",),
        details={"config": "magnitude 2:4 prune + per-row int8 weights (cuSPARSELt) + per-token int8 activations; "
                           "per-image linears Int8WeightOnlyConfig"},
    ),
]
