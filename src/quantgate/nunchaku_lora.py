"""LoRA on nunchaku's SVDQuant FLUX transformers, without re-quantization.

nunchaku concatenates a LoRA's factors to the layer's low-rank branch instead of merging
them into the 4-bit weights, so a LoRA loads in seconds and its strength can change at run
time. Its API lives on the V1 class (``NunchakuFluxTransformer2dModel``):
``update_lora_params(path or state dict)``, ``set_lora_strength(s)`` (one strength for every
loaded LoRA), ``reset_lora()``; several LoRAs are first merged by
``nunchaku.lora.flux.compose.compose_lora([(path, strength), ...])`` with their strengths
baked in. This module plans that sequence from LoRA files (checked without the engine) and
runs it on a loaded transformer. It also writes seeded synthetic LoRAs in the diffusers/PEFT
layout for tests: no LoRA is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# nunchaku's docs: the branch is kept apart from the 4-bit GEMM, and a composed rank above
# this slows inference noticeably.
COMPOSED_RANK_WARNING = 256


@dataclass(frozen=True)
class LoraFile:
    """A LoRA safetensors file and the strength to apply it with."""

    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraFile:
        """``PATH`` or ``PATH:STRENGTH`` (e.g. ``ghibsky.safetensors:0.8``)."""
        path, sep, strength = text.rpartition(":")
        if sep and path and not strength.startswith(("/", "\\")):
            try:
                return cls(Path(path).expanduser(), float(strength))
            except ValueError:
                pass
        return cls(Path(text).expanduser())


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file holds, read from its safetensors header (no tensor data)."""

    path: Path
    layout: str  # "diffusers" (lora_A/lora_B), "kohya" (lora_down/lora_up), "nunchaku" (converted)
    rank: int
    modules: int  # adapted layers


def inspect_lora(path: Path) -> LoraInfo:
    """Layout, rank and adapted layers of a LoRA file; a clear error for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    # nunchaku's own test for its converted format (nunchaku.lora.flux.utils.is_nunchaku_format)
    if any(".mlp_fc" in k or "mlp_context_fc1" in k for k in shapes):
        layout, down_keys = "nunchaku", [k for k in shapes if k.endswith("lora_down")]
    elif any(".lora_A." in k for k in shapes):
        layout, down_keys = "diffusers", [k for k in shapes if ".lora_A." in k]
    elif any(".lora_down." in k for k in shapes):
        layout, down_keys = "kohya", [k for k in shapes if ".lora_down." in k]
    else:
        raise ValueError(f"{path} holds no LoRA factors (no lora_A/lora_B or lora_down/lora_up tensors)")
    ranks = [shapes[k][0] for k in down_keys if len(shapes[k]) == 2]  # down factors are (rank, in) in all three
    if not ranks:
        raise ValueError(f"{path} has no two-dimensional LoRA factors")
    return LoraInfo(path, layout, max(ranks), len(down_keys))


@dataclass(frozen=True)
class LoraPlan:
    """How a set of LoRAs is applied through nunchaku's API."""

    loras: tuple[LoraFile, ...]
    infos: tuple[LoraInfo, ...]
    mode: str  # "single": update_lora_params + set_lora_strength; "composed": compose_lora first
    notes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def composed_rank(self) -> int:
        return sum(info.rank for info in self.infos)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "composed_rank": self.composed_rank, **self.notes,
                "loras": [{"path": str(f.path), "strength": f.strength, "layout": i.layout, "rank": i.rank,
                           "modules": i.modules} for f, i in zip(self.loras, self.infos, strict=True)]}


def plan_loras(loras: Sequence[LoraFile]) -> LoraPlan:
    """Check the files and decide the calls; every problem is raised before the engine is touched."""
    if not loras:
        raise ValueError("no LoRA given")
    for lora in loras:
        if not math.isfinite(lora.strength):
            raise ValueError(f"LoRA strength of {lora.path} must be a finite number, got {lora.strength}")
    infos = tuple(inspect_lora(lora.path) for lora in loras)
    if len(loras) == 1:
        return LoraPlan(tuple(loras), infos, "single")
    converted = [str(i.path) for i in infos if i.layout == "nunchaku"]
    if converted:
        raise ValueError(f"LoRAs already converted to nunchaku's format cannot be composed with others (nunchaku's "
                         f"documentation): {', '.join(converted)}; compose the original files instead")
    plan = LoraPlan(tuple(loras), infos, "composed")
    if plan.composed_rank > COMPOSED_RANK_WARNING:
        plan = LoraPlan(plan.loras, infos, "composed", {
            "warning": f"composed rank {plan.composed_rank} > {COMPOSED_RANK_WARNING}: nunchaku keeps LoRA branches "
                       "beside its fused GEMM and documents a noticeable slowdown at this size"})
    return plan


def apply_loras(transformer: Any, plan: LoraPlan) -> dict[str, Any]:
    """Load ``plan``'s LoRAs into a V1 nunchaku transformer (no re-quantization)."""
    if plan.mode == "single":
        lora = plan.loras[0]
        transformer.update_lora_params(str(lora.path))
        transformer.set_lora_strength(lora.strength)
    else:
        from nunchaku.lora.flux.compose import compose_lora

        transformer.update_lora_params(compose_lora([(str(f.path), f.strength) for f in plan.loras]))
    return plan.describe()


def set_strength(transformer: Any, plan: LoraPlan, strength: float) -> None:
    """Change a single LoRA's strength at run time."""
    if plan.mode != "single":
        raise ValueError("nunchaku's set_lora_strength scales every composed LoRA at once; give each LoRA its "
                         "strength in the composition instead")
    transformer.set_lora_strength(strength)


def reset_loras(transformer: Any) -> None:
    """Remove every loaded LoRA: the transformer computes the base model again."""
    transformer.reset_lora()


def flux_lora_targets(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The attention projections of a FLUX transformer config, (out, in) each: what style LoRAs adapt."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    targets = {}
    for i in range(config["num_layers"]):
        for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            targets[f"transformer_blocks.{i}.attn.{proj}"] = (inner, inner)
    for i in range(config["num_single_layers"]):
        for proj in ("to_q", "to_k", "to_v"):
            targets[f"single_transformer_blocks.{i}.attn.{proj}"] = (inner, inner)
    return targets


def write_synthetic_lora(path: Path, config: Mapping[str, Any], rank: int = 16, seed: int = 0,
                         scale: float = 0.02) -> Path:
    """A seeded random LoRA for a FLUX transformer config in the diffusers/PEFT layout
    (``transformer.<module>.lora_A.weight`` (r, in), ``lora_B.weight`` (out, r)), bf16."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in flux_lora_targets(config).items():
        a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        b = torch.randn(out_features, rank, generator=generator) * scale
        tensors[f"transformer.{module}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"transformer.{module}.lora_B.weight"] = b.to(torch.bfloat16)
    from quantgate.atomic import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "written_by": "quantgate (synthetic test LoRA)"})
    return path
