"""LoRA without peft, for schemes whose layers take a LoRA themselves (``Scheme.lora_attach``).

SVDQuant's claim (arXiv 2411.05007, section 4.4): a LoRA "can be seamlessly fused into the
low-rank branch" of a 4-bit layer, so it needs no re-quantization. ``NativeLoras`` does that
for quantgate's own layers, with the operations ``Adapters`` offers:

- the file is read with the pipeline class's public ``lora_state_dict`` (diffusers converts
  kohya, xlabs and other layouts to the diffusers/peft one there, as ``load_lora_weights``
  does); every ``<module>.lora_A.weight`` (rank x in) / ``lora_B.weight`` (out x rank) pair of
  the denoiser is mapped onto the module of the same path, with the per-module scale
  ``alpha / rank`` peft would use (from the file's adapter metadata or network alphas, the
  same ``LoraConfig`` kwargs diffusers builds; none: scale 1);
- a layer implementing ``apply_loras(pairs)`` (``LowRankLoraTarget``: SVDQuant's
  ``SVDQuantLinear``) takes the active pairs into its own low-rank branch; any other linear
  (bf16 ``nn.Linear``, or a layer declaring ``lora_side_path = True`` such as the W4A16
  ``Int4WeightOnlyLinear``) gets an unfused bf16 side path ``y + s B (A x)`` as a forward hook;
- ``set_strengths`` recomputes every layer from the stored factors (``set_adapters``
  semantics: exactly the named adapters are active, at those weights); ``unload`` puts the
  original branches back (the very tensors) and removes the hooks;
- ``fuse`` refuses (``LoraUnsupported``): the LoRA already is in the low-rank branch, and
  merging it into the 4-bit residual would be the re-quantization the method avoids.

Nothing here touches a quantized residual.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from quantgate.lora.files import LoraFile, LoraMismatch, LoraUnsupported

Pair = tuple[torch.Tensor, torch.Tensor]  # (A (rank, in), strength * scale * B (out, rank)), float32


@runtime_checkable
class LowRankLoraTarget(Protocol):
    """A layer that takes LoRA factors into its own low-rank computation."""

    in_features: int
    out_features: int

    def apply_loras(self, pairs: Sequence[Pair]) -> None:
        """Compute ``W x + sum_i B_i A_i x`` from now on (``B_i`` already scaled); ``[]`` restores
        the layer exactly as it was before the first call."""


@dataclass
class _Factors:
    """One adapter's factors for one module, on the module's device."""

    a: torch.Tensor  # (rank, in)
    b: torch.Tensor  # (out, rank), times the file's alpha / rank


@dataclass
class _Adapter:
    name: str
    lora: LoraFile
    factors: dict[str, _Factors] = field(default_factory=dict)  # module path -> factors


class _SidePath:
    """An unfused low-rank path beside a layer that has no branch of its own (forward hook)."""

    def __init__(self, module: nn.Module):
        self.module, self.pairs, self.handle = module, [], None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for a, b in self.pairs:
            out = out + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return out

    def apply_loras(self, pairs: Sequence[Pair]) -> None:
        self.pairs = [(a.to(torch.bfloat16), b.to(torch.bfloat16)) for a, b in pairs]
        if self.pairs and self.handle is None:
            self.handle = self.module.register_forward_hook(self._hook)
        elif not self.pairs and self.handle is not None:
            self.handle.remove()
            self.handle = None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft's get_pattern_key: a pattern matches a module whose name ends with it at a dot.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scales(config: Mapping[str, Any], modules: Sequence[str]) -> dict[str, float]:
    """``alpha / rank`` per module from ``LoraConfig`` kwargs, as peft's LoraLayer computes it."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for module in modules:
        rank = _pattern_value(rank_pattern, module, r)
        a = _pattern_value(alpha_pattern, module, alpha)
        out[module] = a / rank ** 0.5 if config.get("use_rslora") else a / rank
    return out


def read_lora(pipe: Any, lora: LoraFile, denoiser: str) -> dict[str, Pair]:
    """The denoiser's LoRA pairs in ``lora``: module path -> (A, scale * B), float32 on the CPU.

    Raises LoraMismatch when the file holds nothing for ``denoiser``, LoraUnsupported for
    LoRA variants a plain low-rank pair cannot express (DoRA, LoRA biases, LoKr).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs

    reader = type(pipe).lora_state_dict
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(reader).parameters:  # FLUX's loader separates network alphas
        state, alphas, metadata = reader(str(lora.path), return_alphas=True, **kwargs)
    else:
        (state, metadata), alphas = reader(str(lora.path), **kwargs), None
    prefix = f"{denoiser}."
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise LoraMismatch(f"LoRA {lora.path} ({lora.format} layout) holds no weights for the {denoiser}")
    if "lora_A" not in next(iter(state)):  # the same test diffusers' load_lora_adapter makes
        state = convert_unet_state_dict_to_peft(state)
    if alphas is None:
        # Loaders without network alphas (SD3's) leave ``.alpha`` tensors in the state dict, and
        # peft ignores them as unexpected keys: so do we, to apply what a diffusers user gets.
        state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    other = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if other:
        raise LoraUnsupported(f"LoRA {lora.path} holds {len(other)} tensors that are not plain low-rank pairs "
                              f"(e.g. {other[0]}: DoRA magnitudes, LoRA biases or another adapter type), "
                              "which a low-rank branch cannot take")
    modules = sorted({k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in state})
    unpaired = [m for m in modules if f"{m}.lora_A.weight" not in state or f"{m}.lora_B.weight" not in state]
    if unpaired:
        raise LoraMismatch(f"LoRA {lora.path}: {unpaired[0]} has only one of lora_A / lora_B")
    if metadata:
        config = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or metadata
    else:
        ranks = {f"^{m}.lora_B.weight": state[f"{m}.lora_B.weight"].shape[1] for m in modules}
        alphas = {k.removeprefix(prefix): float(v) for k, v in (alphas or {}).items() if k.startswith(prefix)}
        config = get_peft_kwargs(ranks, alphas, state)
    scales = _scales(config, modules)
    return {m: (state[f"{m}.lora_A.weight"].float(), state[f"{m}.lora_B.weight"].float() * scales[m])
            for m in modules}


def _target(module: nn.Module) -> str | None:
    """How ``module`` takes a LoRA: "branch", "side" or None."""
    if isinstance(module, LowRankLoraTarget):
        return "branch"
    if isinstance(module, nn.Linear) or getattr(module, "lora_side_path", False):
        return "side"
    return None


class NativeLoras:
    """Named LoRA adapters on a denoiser whose layers take them without peft (see the module docstring)."""

    fuse_refusal = ("the LoRA is already fused into each layer's low-rank branch at load (down' = "
                    "[down; A diag(smooth)], up' = [up, s B]), so fuse/unfuse would change nothing; merging it "
                    "into the 4-bit residual instead would re-quantize it, which SVDQuant's LoRA path avoids. "
                    "The other LoRA tests gate this path")

    def __init__(self, pipe: Any, denoiser: str, scheme_name: str = ""):
        self.pipe, self.denoiser, self.scheme_name = pipe, denoiser, scheme_name
        self.adapters: dict[str, _Adapter] = {}
        self.strengths: dict[str, float] = {}  # the active adapters
        self._paths: dict[str, Any] = {}  # module path -> the layer or its side path, while it holds a LoRA

    @property
    def module(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser)

    def load(self, lora: LoraFile, name: str, strength: float | None = None) -> str:
        """Read ``lora`` as adapter ``name`` and activate it (at ``strength``, alone; else at 1
        beside the active ones)."""
        if name in self.adapters:
            raise ValueError(f"Adapter name {name} already in use in the model - please select a new adapter name.")
        root = self.module
        pairs = read_lora(self.pipe, lora, self.denoiser)
        adapter = _Adapter(name, lora)
        for path, (a, b) in pairs.items():
            try:
                layer = root.get_submodule(path)
            except AttributeError:
                raise LoraMismatch(f"LoRA {lora.path} ({lora.format} layout) targets {path}, which the "
                                   f"{self.denoiser} does not have: not found in the base model") from None
            if _target(layer) is None:
                raise LoraUnsupported(f"{self.scheme_name}: LoRA {lora.path} targets {path}, a "
                                      f"{type(layer).__name__}, which has no low-rank branch and is no linear")
            if (layer.out_features, layer.in_features) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
                raise LoraMismatch(f"LoRA {lora.path}: size mismatch at {path}: A {tuple(a.shape)}, B "
                                   f"{tuple(b.shape)} for a layer of {layer.in_features} -> {layer.out_features}")
            device = _device_of(layer)
            adapter.factors[path] = _Factors(a.to(device), b.to(device))
        self.adapters[name] = adapter
        self.set_strengths({name: strength} if strength is not None else {**self.strengths, name: 1.0})
        return name

    def adapter_names(self) -> list[str]:
        """Loaded adapters, active or not."""
        return list(self.adapters)

    def set_strengths(self, strengths: Mapping[str, float]) -> None:
        """Exactly these adapters are active at these weights; every layer is recomputed."""
        unknown = sorted(set(strengths) - set(self.adapters))
        if unknown:
            raise ValueError(f"Adapter name(s) {unknown} not in the list of present adapters: {list(self.adapters)}")
        self.strengths = {k: float(v) for k, v in strengths.items()}
        self._apply()

    def _apply(self) -> None:
        root = self.module
        paths = sorted({p for adapter in self.adapters.values() for p in adapter.factors})
        for path in paths:
            # Strength 0 adds nothing: leaving the pair out keeps the layer exactly as it was.
            pairs = [(f.a, f.b * s) for name, s in self.strengths.items() if s != 0
                     for f in [self.adapters[name].factors.get(path)] if f is not None]
            holder = self._paths.get(path)
            if holder is None:
                layer = root.get_submodule(path)
                holder = layer if _target(layer) == "branch" else _SidePath(layer)
                self._paths[path] = holder
            holder.apply_loras(pairs)
        for path in set(self._paths) - set(paths):  # adapters removed since
            self._paths.pop(path).apply_loras([])

    def fuse(self) -> None:
        """Refused with the reason (see ``fuse_refusal``)."""
        raise LoraUnsupported(f"{self.scheme_name}: fuse_lora is not applicable: {self.fuse_refusal}")

    def unfuse(self) -> None:
        """Nothing is ever fused beyond the branch: nothing to do."""

    def unload(self) -> None:
        """Remove every adapter: each layer gets its original branch back, side paths go."""
        self.adapters.clear()
        self.strengths = {}
        for holder in self._paths.values():
            holder.apply_loras([])
        self._paths.clear()

    def wrapped_layers(self) -> int:
        """How many layers hold a loaded adapter's factors."""
        return len({p for adapter in self.adapters.values() for p in adapter.factors})

    def close(self) -> None:
        if self.adapters or self._paths:
            self.unload()


def _device_of(layer: nn.Module) -> torch.device:
    tensor = next(iter(layer.buffers()), None)
    if tensor is None:
        tensor = next(iter(layer.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
