"""Synthetic LoRAs: seeded low-rank deltas for any registered model, written as real LoRA files.

``make_synthetic_lora`` reads the denoiser's linear weights from the pipeline directory (its
safetensors files: any source, no model is built), draws ``A`` (rank x in) and ``B``
(out x rank) from a seeded generator for every targeted layer, and scales ``B`` so that
``||B A||_F = relative_norm * ||W||_F`` for that layer: the delta is a fixed fraction of each
weight it touches, on real and on synthetic weights alike. The result is written with
diffusers' own ``save_lora_weights`` (the diffusers/peft layout, alpha = rank, so strength
1 applies ``B A`` as is) into a content-addressed directory under the quantgate cache:
``<cache>/lora/<model>-<digest>/``, the digest covering the recipe and the identity of the
weight files, written under a temporary name and renamed into place with a manifest.

``combine_loras`` writes the LoRA that equals several LoRAs applied together at given
strengths: ``sum_i s_i B_i A_i = [B_1 ... B_n] [s_1 A_1; ...; s_n A_n]``, one adapter of the
summed rank. It is the exact reference for composing adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from quantgate.atomic import atomic_directory, atomic_write_json, file_lock
from quantgate.cache import mark_used
from quantgate.integrity import safetensors_problem
from quantgate.lora.files import LORA_WEIGHT_NAME, LoraFile
from quantgate.models.registry import ModelSpec

FORMAT_VERSION = 1
MANIFEST = "quantgate-lora.json"

# The linears LoRA trainers for FLUX.1 and SD3 adapt by default (diffusers' DreamBooth-LoRA
# scripts with all blocks, kohya's sd-scripts, ai-toolkit): attention projections and MLPs of
# every repeated block. adaLN modulation, embedders and the output layer stay untouched.
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.")


@dataclass(frozen=True)
class SyntheticLoraRecipe:
    """Everything that decides a synthetic LoRA's tensors, besides the base weights."""

    seed: int = 0
    rank: int = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes inside the repeated blocks, as peft matches them
    # ||B A||_F / ||W||_F of every targeted layer. 0.5 moves the tiny FLUX.1 and SD3.5
    # transformers' output by 5-7% (0.2 moved it 2%, too close to int8's 1% noise; 1.0 moved it
    # 12% and doubling the strength from there grew the effect 2.8x: past the linear range).
    relative_norm: float = 0.5

    def identity(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **asdict(self), "targets": list(self.targets)}


def _weight_files(denoiser_dir: Path) -> list[Path]:
    index = sorted(denoiser_dir.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [denoiser_dir / s for s in shards]
    files = sorted(denoiser_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{denoiser_dir} has no *.safetensors weights to make a LoRA for")
    return files


def linear_weights(denoiser_dir: Path) -> dict[str, tuple[tuple[int, int], Path]]:
    """Every 2-D ``<module>.weight`` of the denoiser: module name -> ((out, in), file). Headers only."""
    from safetensors import safe_open

    found = {}
    for path in _weight_files(denoiser_dir):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".weight"):
                    shape = tuple(fh.get_slice(key).get_shape())
                    if len(shape) == 2:
                        found[key.removesuffix(".weight")] = ((int(shape[0]), int(shape[1])), path)
    return found


def select_targets(modules: Iterable[str], targets: Sequence[str]) -> list[str]:
    """The modules inside the repeated blocks whose name ends with one of ``targets`` (sorted)."""
    return sorted(m for m in modules if _BLOCK.match(m) and any(m == t or m.endswith("." + t) for t in targets))


def _files_identity(files: Iterable[Path]) -> list[dict[str, Any]]:
    # Synthetic components and hub blobs are content-addressed in their real paths; a user's
    # directory also changes size or mtime when its weights change.
    out = []
    for path in files:
        real, st = Path(os.path.realpath(path)), os.stat(path)
        out.append({"file": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def lora_root(cache_dir: str | os.PathLike[str]) -> Path:
    """Where synthetic and combined LoRAs live: ``<cache>/lora``."""
    return Path(cache_dir) / "lora"


def _cached(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete LoRA directory, or None when it must be (re)built."""
    manifest, weights = directory / MANIFEST, directory / LORA_WEIGHT_NAME
    if not (manifest.is_file() and weights.is_file()) or safetensors_problem(weights) is not None:
        return None
    try:
        found = json.loads(manifest.read_text())
    except ValueError:
        return None
    mark_used(directory)
    return found


def _save(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], out: Path) -> None:
    # diffusers' own writer: the file is what a user's training script would have produced.
    spec.pipeline_class().save_lora_weights(out, transformer_lora_layers=dict(tensors), weight_name=LORA_WEIGHT_NAME)


def _frobenius(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.float()))


def _delta_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    # ||B A||_F^2 = sum((B^T B) * (A A^T)): rank x rank products, never the out x in delta.
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0)) ** 0.5


def _draw(recipe: SyntheticLoraRecipe, layers: Mapping[str, tuple[tuple[int, int], float]],
          ) -> tuple[dict[str, torch.Tensor], list[float]]:
    generator = torch.Generator().manual_seed(recipe.seed)
    tensors, achieved = {}, []
    for name, ((out_f, in_f), weight_norm) in layers.items():
        rank = min(recipe.rank, out_f, in_f)
        a = torch.randn(rank, in_f, generator=generator) / in_f ** 0.5
        b = torch.randn(out_f, rank, generator=generator) / rank ** 0.5
        delta_norm = _delta_norm(a, b)
        b *= recipe.relative_norm * weight_norm / delta_norm if delta_norm > 0 else 0.0
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
        achieved.append(_delta_norm(a.float(), b.float()) / weight_norm if weight_norm > 0 else 0.0)
    return tensors, achieved


def make_synthetic_lora(spec: ModelSpec, pipeline_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
                        recipe: SyntheticLoraRecipe | None = None, *, device: str = "cpu") -> LoraFile:
    """A seeded LoRA file for ``spec``'s denoiser as stored in ``pipeline_dir`` (built once, then reused).

    ``device`` is where the base weights' norms are computed (the GPU for full-size models).
    """
    from safetensors import safe_open

    recipe = recipe or SyntheticLoraRecipe()
    denoiser_dir = Path(pipeline_dir) / spec.denoiser
    files = _weight_files(denoiser_dir)
    key = {"model": spec.name, "denoiser": spec.denoiser, "recipe": recipe.identity(),
           "weights": _files_identity(files)}
    final = lora_root(cache_dir) / f"{spec.name}-{_digest(key)}"
    with file_lock(final.with_name(final.name + ".lock")):
        manifest = _cached(final)
        if manifest is None:
            start = time.perf_counter()
            weights = linear_weights(denoiser_dir)
            names = select_targets(weights, recipe.targets)
            if not names:
                raise ValueError(f"no module of {spec.name}'s {spec.denoiser} in {denoiser_dir} matches the LoRA "
                                 f"targets {list(recipe.targets)}")
            norms = {}
            for path in sorted({weights[name][1] for name in names}):
                with safe_open(str(path), framework="pt", device=device) as fh:
                    norms.update({name: _frobenius(fh.get_tensor(f"{name}.weight"))
                                  for name in names if weights[name][1] == path})
            tensors, achieved = _draw(recipe, {name: (weights[name][0], norms[name]) for name in names})
            with atomic_directory(final) as tmp:
                _save(spec, tensors, tmp)
                manifest = {**key, "layers": len(names), "parameters": sum(t.numel() for t in tensors.values()),
                            "relative_norm_achieved": {"min": min(achieved), "max": max(achieved)},
                            "seconds": round(time.perf_counter() - start, 3)}
                atomic_write_json(tmp / MANIFEST, manifest)
    detail = f"seed {recipe.seed}, rank {recipe.rank}, ||BA||/||W|| {recipe.relative_norm}, {manifest['layers']} layers"
    return LoraFile(final / LORA_WEIGHT_NAME, "synthetic", "peft", detail, model=spec.name,
                    recipe={**recipe.identity(), "layers": manifest["layers"], "parameters": manifest["parameters"]})


def _peft_tensors(lora: LoraFile, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if lora.format != "peft":
        raise ValueError(f"combining needs LoRAs in the diffusers/peft layout; {lora.path} is {lora.format}")
    return {k.removeprefix(prefix): v for k, v in load_file(str(lora.path)).items()}


def combine_loras(spec: ModelSpec, parts: Sequence[tuple[LoraFile, float]],
                  cache_dir: str | os.PathLike[str]) -> LoraFile:
    """One LoRA equal to ``parts`` applied together at their strengths (ranks concatenated).

    Every part must target the same modules (as synthetic LoRAs of one recipe do). Built once
    per parts and strengths, in float32 so the strengths are not rounded into bf16.
    """
    prefix = f"{spec.denoiser}."
    key = {"combined": [{"file": _files_identity([lora.path])[0], "strength": float(s)} for lora, s in parts],
           "model": spec.name, "format": FORMAT_VERSION}
    final = lora_root(cache_dir) / f"{spec.name}-combined-{_digest(key)}"
    with file_lock(final.with_name(final.name + ".lock")):
        if _cached(final) is None:
            tensors = [(_peft_tensors(lora, prefix), float(s)) for lora, s in parts]
            keys = set(tensors[0][0])
            for (other, _), (lora, _) in zip(tensors[1:], parts[1:], strict=True):
                if set(other) != keys:
                    raise ValueError(f"{lora.path} targets other modules than {parts[0][0].path}: cannot concatenate")
            combined = {}
            for k in sorted(keys):
                if k.endswith(".lora_A.weight"):
                    combined[k] = torch.cat([t[k].float() * s for t, s in tensors], dim=0).contiguous()
                elif k.endswith(".lora_B.weight"):
                    combined[k] = torch.cat([t[k].float() for t, _ in tensors], dim=1).contiguous()
                else:
                    raise ValueError(f"combining plain LoRAs only: {k} is neither lora_A nor lora_B")
            with atomic_directory(final) as tmp:
                _save(spec, combined, tmp)
                atomic_write_json(tmp / MANIFEST, key)
    detail = " + ".join(f"{s:g} x {lora.name}" for lora, s in parts)
    return LoraFile(final / LORA_WEIGHT_NAME, "synthetic", "peft", f"ranks concatenated: {detail}", model=spec.name,
                    recipe={"combined": [{"lora": str(lora.path), "strength": float(s)} for lora, s in parts]})
