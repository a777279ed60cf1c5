"""TorchAO schemes through diffusers' ``TorchAoConfig`` with torchao config objects.

Each entry names the torchao config class and its arguments; adding a scheme (fp8 row-wise,
int4 weight-only, 2:4 sparsity) is one more entry in ``SCHEMES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from quantgate.schemes.base import Requirements, Scheme

_TORCHAO = {"torchao": ">=0.15"}


def _torchao_config(config_class: str, **kwargs: Any) -> Callable[[tuple[str, ...]], Any]:
    def build(components: tuple[str, ...]) -> Any:
        import torchao.quantization as tq
        from diffusers import PipelineQuantizationConfig, TorchAoConfig

        ao_config = getattr(tq, config_class)(**kwargs)
        return PipelineQuantizationConfig(quant_mapping={name: TorchAoConfig(ao_config) for name in components})

    return build


def _entry(name: str, summary: str, config_class: str, kwargs: Mapping[str, Any] | None = None,
           requires: Requirements | None = None) -> Scheme:
    kwargs = dict(kwargs or {})
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return Scheme(
        name=name,
        summary=summary,
        backend="torchao",
        requires=requires or Requirements(packages=_TORCHAO),
        quantization_config=_torchao_config(config_class, **kwargs),
        markers=("torchao",),
        details={"config": f"TorchAoConfig({config_class}({args}))"},
    )


SCHEMES = [
    _entry("int8-wo", "int8 weights (per-row scales), bf16 activations", "Int8WeightOnlyConfig"),
    _entry("int8-dq", "int8 weights and dynamically quantized int8 activations (per-token)",
           "Int8DynamicActivationInt8WeightConfig"),
]
