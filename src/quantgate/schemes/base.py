"""What a quantization scheme is: requirements it declares and how it is applied.

A scheme is a small declarative entry. ``quantization_config`` returns the diffusers
``PipelineQuantizationConfig`` (or ``None`` for an unquantized baseline), so loading goes
through ``Pipeline.from_pretrained(dir, quantization_config=...)`` like any diffusers user's
code. Backends that diffusers cannot express add a ``post_load`` step instead.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from quantgate.hardware import DeviceInfo
from quantgate.models import ModelSpec
from quantgate.quant.calibration import CalibrationSettings


@dataclass(frozen=True)
class Requirements:
    """What must hold for a scheme to run; ``unmet`` says in words what does not."""

    packages: Mapping[str, str] = field(default_factory=dict)  # distribution -> specifier
    devices: frozenset[str] = frozenset({"cuda", "cpu"})
    min_capability: tuple[int, int] | None = None
    max_capability: tuple[int, int] | None = None
    device_note: str = ""  # why a device is excluded, appended to the skip reason
    capability_note: str = ""
    # Exact compute capabilities an engine is built for (nunchaku: sm_75/80/86/89 for INT4),
    # checked besides the min/max range; None allows any.
    capabilities: frozenset[tuple[int, int]] | None = None
    models: frozenset[str] | None = None  # models the scheme supports; None: every model
    model_note: str = ""
    # A last check after the packages (e.g. that an installed distribution is the right
    # project): returns the reason it fails, or None.
    probe: Callable[[], str | None] | None = None

    def unmet(self, scheme: str, device: DeviceInfo, model: str | None = None) -> str | None:
        """The reason ``scheme`` cannot run on ``device`` (for ``model``, when given) with the
        installed packages, or None. Hardware is checked before packages: installing a package
        does not help a GPU the engine has no kernels for."""
        if device.type not in self.devices:
            allowed = " or ".join("a CUDA GPU" if d == "cuda" else "the CPU" for d in sorted(self.devices))
            note = f" ({self.device_note})" if self.device_note else ""
            return f"{scheme} runs only on {allowed}{note}; the device here is {device.type}"
        if model is not None and self.models is not None and model not in self.models:
            note = f" ({self.model_note})" if self.model_note else ""
            return f"{scheme} supports only {', '.join(sorted(self.models))}, not {model}{note}"
        if device.capability is not None:
            low, high = self.min_capability, self.max_capability
            if (low and device.capability < low) or (high and device.capability > high):
                bounds = f"sm_{low[0]}{low[1]}" if low else "any"
                bounds += f"–sm_{high[0]}{high[1]}" if high else " or newer"
                note = f" ({self.capability_note})" if self.capability_note else ""
                return f"{scheme} needs compute capability {bounds}; {device.name} is {device.sm}{note}"
            if self.capabilities is not None and tuple(device.capability) not in self.capabilities:
                names = [f"sm_{a}{b}" for a, b in sorted(self.capabilities)]
                allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
                note = f" ({self.capability_note})" if self.capability_note else ""
                return f"{scheme} needs compute capability {allowed}; {device.name} is {device.sm}{note}"
        for dist, spec in self.packages.items():
            try:
                installed = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                return f"{scheme} needs {dist}{spec}, which is not installed: pip install '{dist}{spec}'"
            try:
                ok = Version(installed) in SpecifierSet(spec, prereleases=True)
            except InvalidVersion:
                ok = True  # local builds with odd version strings: let the import decide
            if not ok:
                return f"{scheme} needs {dist}{spec}, found {dist} {installed}: pip install -U '{dist}{spec}'"
        if self.probe is not None:
            return self.probe()
        return None


@dataclass(frozen=True)
class QuantizationRequest:
    """What a scheme is asked to quantize: which model, which of its components.

    Schemes that calibrate on the pipeline (GPTQ, SVDQuant) also get the weights' identity
    (``identity``: what decides their cached statistics and quantized checkpoints), a cache
    directory, the device, and the calibration settings (prompts, samples, call arguments).
    """

    spec: ModelSpec
    components: tuple[str, ...]
    device: str = "cpu"
    identity: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    calibration: CalibrationSettings | None = None


@dataclass(frozen=True)
class QuantizationPlan:
    """A scheme's answer: the diffusers config to load with, and facts to record about it."""

    config: Any | None  # a diffusers PipelineQuantizationConfig, or None for no quantization
    notes: Mapping[str, Any] = field(default_factory=dict)
    # Components the scheme builds itself instead of loading them from the directory (e.g. a
    # pre-quantized nunchaku transformer): name -> loader taking the device; each result is
    # passed to ``Pipeline.from_pretrained`` as that component.
    components: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)


def _no_quantization(request: QuantizationRequest) -> QuantizationPlan:
    return QuantizationPlan(None)


@dataclass(frozen=True)
class Scheme:
    """A registered way of loading (and quantizing) a pipeline."""

    name: str
    summary: str
    backend: str  # "none", "bitsandbytes", "torchao", ...
    requires: Requirements = field(default_factory=Requirements)
    plan: Callable[[QuantizationRequest], QuantizationPlan] = _no_quantization
    # For methods diffusers cannot express: transforms the loaded pipeline in place and
    # returns facts to record.
    post_load: Callable[[Any, QuantizationRequest], Mapping[str, Any]] | None = None
    markers: tuple[str, ...] = ()
    # Extra facts recorded with every result (the exact backend config used, and why).
    details: Mapping[str, Any] = field(default_factory=dict)
    # Why a LoRA cannot be applied to this scheme's pipeline (the LoRA tests skip with it).
    # None: LoRAs load through diffusers' load_lora_weights, and peft either wraps the layers
    # (nn.Linear, bitsandbytes, torchao) or refuses a custom layer type, which skips too.
    lora_unsupported: str | None = None
    # The scheme's own LoRA mechanism, for layers peft cannot wrap: (pipe, denoiser name) -> an
    # object with Adapters' operations (quantgate.lora.native.NativeLoras). None: diffusers/peft.
    lora_attach: Callable[[Any, str], Any] | None = None
    # Why loading the bf16 model and quantizing it (post_load) is a step a user runs once,
    # offline, on a bigger GPU, and ships the result. Under a GPU budget that step runs
    # uncapped on the GPU (its peak recorded apart) and the budget applies from then on.
    # None: loading is what the user does on the small card, and it is capped too.
    offline_quantization: str | None = None

    def describe(self) -> dict[str, Any]:
        """What a benchmark record says about this scheme."""
        return {"name": self.name, "backend": self.backend, "summary": self.summary, **self.details}
