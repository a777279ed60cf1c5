"""Calibration: statistics of every linear layer's inputs while the pipeline generates.

Our own quantizers (GPTQ, SVDQuant) need to know what the denoiser's linears see over a
real sampling trajectory: GPTQ a Hessian ``2 X Xᵀ`` per layer, SVDQuant/SmoothQuant the
largest absolute activation per input channel. Activations are never stored: each layer's
forward pre-hook folds its input into a small accumulator as the pipeline runs (streaming),
so calibrating on hundreds of images costs no more memory than one.

Statistics are cached on disk (safetensors + JSON) under a key made of everything that
decides them, so quantization can be rerun without recalibrating.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from quantgate.atomic import atomic_file, atomic_write_json
from quantgate.cache import mark_used


class Accumulator(Protocol):
    """Folds a layer's inputs into a fixed-size statistic."""

    kind: str

    def update(self, x: torch.Tensor) -> None:
        """Fold one input batch ``x`` of shape (..., in_features)."""

    def state(self) -> dict[str, torch.Tensor]:
        """The statistic as named tensors (what is cached)."""


class ChannelAbsMax:
    """Largest |x| seen per input channel (SmoothQuant's activation statistic)."""

    kind = "absmax"

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        torch.maximum(self.absmax, rows.abs().amax(dim=0).float(), out=self.absmax)

    def state(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax}


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rowsᵀ rows`` in float32.

    bf16/fp16 rows on CUDA multiply on tensor cores with float32 output (``out_dtype``, torch
    2.8+): the products of 16-bit values are exact in float32 and cuBLAS accumulates in float32,
    so this equals the float32 product up to summation order, several times faster (it runs for
    every linear at every denoising step of the calibration).
    """
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(rows.t(), rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8: no mixed-output GEMM
            pass
    rows = rows.float()
    return rows.t() @ rows


class Hessian:
    """GPTQ's layer Hessian ``H = 2/n · Σ x xᵀ`` over every input row seen (float32)."""

    kind = "hessian"

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        self.sum.add_(gram(rows))
        self.rows += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.rows, 1))

    def state(self) -> dict[str, torch.Tensor]:
        return {"hessian": self.hessian, "rows": torch.tensor([self.rows], dtype=torch.int64)}


AccumulatorFactory = Callable[[str, torch.nn.Linear], Accumulator]


@dataclass(frozen=True)
class CalibrationSettings:
    """What a calibration run feeds the pipeline: prompts, how many samples, the seed."""

    prompts: tuple[str, ...]
    samples: int = 256
    cpu_samples: int = 16  # the CPU tier runs tiny models: a few samples exercise the same code
    batch_size: int = 1
    seed: int = 0
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)  # steps, guidance, resolution ...
    prompts_file: str = ""  # where the prompts came from, for messages

    def for_device(self, device: str, call_kwargs: Mapping[str, Any]) -> CalibrationSettings:
        """These settings for one case: its call arguments, and the CPU sample count on a CPU."""
        samples = self.cpu_samples if device == "cpu" else self.samples
        return replace(self, samples=samples, call_kwargs={**call_kwargs, **self.call_kwargs})

    def sample_prompts(self) -> list[str]:
        """``samples`` prompts, cycling through the prompt list."""
        if not self.prompts:
            where = self.prompts_file or "the calibration prompt file"
            raise ValueError(f"calibration needs at least one prompt: {where} is missing or empty "
                             "(pass --quantgate-calibration-prompts FILE)")
        return [self.prompts[i % len(self.prompts)] for i in range(self.samples)]

    def key_facts(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "samples": self.samples, "batch_size": self.batch_size,
                "seed": self.seed, "call_kwargs": dict(sorted(self.call_kwargs.items()))}


def select_linears(module: torch.nn.Module, pattern: str | None = None,
                   exclude: str | None = None) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` submodules whose qualified name fully matches ``pattern`` (all when None)
    and not ``exclude``."""
    keep = re.compile(pattern) if pattern else None
    drop = re.compile(exclude) if exclude else None
    return {name: m for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and (keep is None or keep.fullmatch(name))
            and not (drop is not None and drop.fullmatch(name))}


def collect(pipe: Any, denoiser: torch.nn.Module, layers: Mapping[str, torch.nn.Linear],
            make: AccumulatorFactory, settings: CalibrationSettings, *, device: str | None = None,
            desc: str = "quantgate: calibration") -> dict[str, Accumulator]:
    """Run ``pipe`` over the calibration prompts, folding every input of ``layers`` into
    accumulators made by ``make``; returns them by layer name.

    The pipeline stops at latents (no VAE decode): only the denoiser's inputs matter.
    """
    accumulators = {name: make(name, linear) for name, linear in layers.items()}
    handles = []
    for name, linear in layers.items():
        acc = accumulators[name]
        handles.append(linear.register_forward_pre_hook(lambda _m, args, acc=acc: acc.update(args[0])))
    prompts = settings.sample_prompts()
    run_device = device or str(next(denoiser.parameters()).device)
    generator = torch.Generator(device=run_device).manual_seed(settings.seed)
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="sample") as bar:
            for start in range(0, len(prompts), settings.batch_size):
                batch = prompts[start:start + settings.batch_size]
                pipe(prompt=batch, generator=generator, output_type="latent", **settings.call_kwargs)
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def calibration_key(identity: Mapping[str, Any], settings: CalibrationSettings, kind: str,
                    layers: Iterable[str]) -> str:
    """A content key for cached statistics: weights identity, settings, statistic, layer names."""
    return content_key({"identity": dict(identity), "settings": settings.key_facts(), "kind": kind,
                        "layers": sorted(layers)})


def content_key(facts: Mapping[str, Any]) -> str:
    """A short stable key for cached data: the sha256 of ``facts`` as sorted JSON."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class StatsCache:
    """Calibration statistics on disk: ``<dir>/<key>.safetensors`` + ``<key>.json`` (the facts)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.safetensors", self.directory / f"{key}.json"

    def load(self, key: str) -> dict[str, dict[str, torch.Tensor]] | None:
        """Cached statistics by layer name, or None if absent or unreadable."""
        from safetensors.torch import load_file

        tensors_path, meta_path = self._paths(key)
        if not (tensors_path.is_file() and meta_path.is_file()):
            return None
        try:
            flat = load_file(tensors_path)
        except Exception:  # a truncated or foreign file is rebuilt, not trusted
            return None
        mark_used(tensors_path, meta_path)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in flat.items():
            layer, _, stat = name.rpartition("::")
            out.setdefault(layer, {})[stat] = tensor
        return out

    def save(self, key: str, stats: Mapping[str, Mapping[str, torch.Tensor]], facts: Mapping[str, Any]) -> Path:
        """Write statistics atomically; returns the tensor file's path."""
        from safetensors.torch import save_file

        flat = {f"{layer}::{stat}": t.detach().to("cpu").contiguous() for layer, named in stats.items()
                for stat, t in named.items()}
        tensors_path, meta_path = self._paths(key)
        # Straight to a temporary file, then renamed: Hessians of a full-size denoiser are
        # gigabytes, and serializing them to bytes first would hold them twice in memory.
        with atomic_file(tensors_path) as tmp:
            save_file(flat, str(tmp))
        atomic_write_json(meta_path, dict(facts))
        return tensors_path


def collect_cached(pipe: Any, denoiser: torch.nn.Module, layers: Mapping[str, torch.nn.Linear],
                   make: AccumulatorFactory, kind: str, settings: CalibrationSettings,
                   identity: Mapping[str, Any], cache_dir: str | Path | None,
                   desc: str = "quantgate: calibration") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Statistics of ``layers`` from the cache, else collected and cached.

    Returns (stats by layer, facts) where facts say whether the cache was hit and where.
    """
    key = calibration_key(identity, settings, kind, layers)
    cache = StatsCache(Path(cache_dir) / "calibration") if cache_dir is not None else None
    facts: dict[str, Any] = {"key": key, "kind": kind, "samples": settings.samples, "layers": len(layers)}
    if cache is not None and (cached := cache.load(key)) is not None and set(cached) == set(layers):
        return cached, {**facts, "cache": "hit", "path": str(cache.directory)}
    accumulators = collect(pipe, denoiser, layers, make, settings, desc=desc)
    stats = {name: acc.state() for name, acc in accumulators.items()}
    if cache is not None:
        cache.save(key, stats, {**facts, **settings.key_facts(), "identity": dict(identity)})
    return stats, {**facts, "cache": "miss" if cache is not None else "off"}

