"""Execution variants of a loaded pipeline: eager, and torch.compile of the repeated blocks.

Regional compilation (each repeated transformer block compiled once and reused) is what
diffusers recommends for FLUX and SD3: most of the speed of compiling the whole model in a
fraction of the compile time. Compiled artifacts persist in inductor's cache (quantgate points
``TORCHINDUCTOR_CACHE_DIR`` into its own cache), so a second run compiles far less.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from quantgate import offload
from quantgate.cache import mark_used
from quantgate.errors import UnknownNameError

COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": False, "dynamic": False, "mode": None}


@dataclass(frozen=True)
class Variant:
    """How a loaded pipeline is prepared before it runs."""

    name: str
    summary: str
    # Prepares the denoiser in place; returns facts to record (what was compiled...).
    apply: Callable[[torch.nn.Module], dict[str, Any]]
    # Prepares the whole pipeline (pipe, device) after ``apply``; offload variants place modules.
    prepare: Callable[[Any, str], dict[str, Any]] | None = None
    # Load without ``device_map`` (components stay on the CPU unless their quantizer places
    # them): the variant moves modules itself, and a model larger than a budget cannot load
    # onto the GPU first.
    loads_on_cpu: bool = False
    # With ``loads_on_cpu``: the denoiser alone loads (and quantizes) on the device.
    denoiser_on_device: bool = False
    devices: frozenset[str] = field(default_factory=lambda: frozenset({"cpu", "cuda"}))
    why_devices: str = ""

    def unmet(self, device: str) -> str | None:
        """Why this variant cannot run on ``device``, or None."""
        if device.split(":")[0] in self.devices:
            return None
        return f"variant {self.name} runs only on {', '.join(sorted(self.devices))}: {self.why_devices}"


def compile_repeated_blocks(denoiser: torch.nn.Module) -> dict[str, Any]:
    """torch.compile each repeated block of ``denoiser`` in place; say which were compiled."""
    names = tuple(getattr(denoiser, "_repeated_blocks", None) or ())
    if names:
        blocks = [m for m in denoiser.modules() if type(m).__name__ in names]
    else:  # models without diffusers' _repeated_blocks: the blocks of every ModuleList child
        blocks = [b for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no repeated blocks to compile")
    options = {k: v for k, v in COMPILE_OPTIONS.items() if v is not None}
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):  # reused now: last in line for `quantgate cache` eviction
        mark_used(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    for block in blocks:
        block.compile(**options)
    return {"compiled_blocks": dict(Counter(type(b).__name__ for b in blocks)), "compile_options": options}


VARIANTS: dict[str, Variant] = {
    "eager": Variant("eager", "PyTorch eager mode, no compilation", lambda denoiser: {}),
    "compile": Variant("compile", "torch.compile (inductor) of each repeated transformer block", compile_repeated_blocks),
}


# -- CPU offload: baselines under a GPU budget (quantgate.offload) ---------------------------


def _offload(name: str, summary: str, prepare: Callable[[Any, str], dict[str, Any]],
             denoiser_on_device: bool = False) -> Variant:
    return Variant(name, summary, lambda denoiser: {}, prepare=prepare, loads_on_cpu=True,
                   denoiser_on_device=denoiser_on_device, devices=frozenset({"cuda"}),
                   why_devices=offload.WHY_GPU_ONLY)


VARIANTS.update({v.name: v for v in (
    _offload("model-offload", "diffusers model CPU offload: one whole model on the GPU at a time",
             offload.model_offload),
    _offload("sequential-offload", "diffusers sequential CPU offload: one leaf module's weights on the GPU at a time",
             offload.sequential_offload),
    _offload("group-offload", "diffusers group offloading: one transformer block per group, streamed ahead of use",
             offload.group_offload),
    _offload("encoder-offload", "text encoders streamed from the CPU layer by layer (diffusers group offloading); "
             "the denoiser and VAE stay on the GPU", offload.encoder_offload, denoiser_on_device=True),
)})


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownNameError("variant", name, VARIANTS) from None
