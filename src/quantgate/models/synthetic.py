"""Synthetic weights: the true architectures with seeded random weights, on disk.

Each component is materialized once into a content-addressed directory
(``<cache>/synthetic/components/<class>-<digest>``, the digest covering class, config, seed
and dtype), so FLUX.1 and SD3.5 share one T5-XXL encoder on disk. A model's pipeline
directory (``<cache>/synthetic/pipelines/<model>-<size>-<digest>``) holds its
``model_index.json`` and relative symlinks to its components: the result is an ordinary
diffusers directory, loaded by ``Pipeline.from_pretrained`` exactly as hub weights are.

Nothing half-written is ever used. Every directory is built under a temporary name and
renamed into place with a manifest written last; on reuse, the manifest, the size of every
file and each safetensors header are checked, and a directory that fails is rebuilt.
Speed and memory measured on these weights are real; image quality is not meaningful.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from quantgate.atomic import atomic_directory, atomic_write_json, file_lock
from quantgate.cache import mark_used
from quantgate.hardware import library_version
from quantgate.integrity import file_sizes, manifest_problem, safetensors_marks
from quantgate.models.registry import ComponentSpec, ModelSpec, Size
from quantgate.models.tokenizers import generate_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "quantgate-synthetic.json"
WEIGHT_DTYPE = "bfloat16"


@dataclass(frozen=True)
class ComponentRecipe:
    """Everything that determines a synthetic component's bytes."""

    component: ComponentSpec
    size: Size
    seed: int

    def identity(self) -> dict[str, Any]:
        comp = self.component
        return {
            "format": FORMAT_VERSION,
            "library": comp.library,
            "class": comp.cls,
            "role": comp.role,
            "generator": comp.generator,
            "config": comp.config_for(self.size),
            "seed": self.seed if comp.role == "model" else None,
            "dtype": WEIGHT_DTYPE if comp.role == "model" else None,
        }

    @property
    def digest(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.component.cls.lower()}-{self.digest}"


def synthetic_root(cache_dir: str | os.PathLike[str]) -> Path:
    """Where synthetic weights live under a quantgate cache directory."""
    return Path(cache_dir) / "synthetic"


def recipes_for(spec: ModelSpec, size: Size, seed: int) -> dict[str, ComponentRecipe]:
    """One recipe per pipeline component of ``spec`` at ``size``."""
    return {c.name: ComponentRecipe(c, size, seed) for c in spec.components}


def pipeline_dirname(spec: ModelSpec, size: Size, recipes: Mapping[str, ComponentRecipe]) -> str:
    blob = json.dumps({"model_index": spec.model_index(), "components": {n: r.digest for n, r in recipes.items()}},
                      sort_keys=True).encode()
    return f"{spec.name}-{size}-{hashlib.sha256(blob).hexdigest()[:16]}"


# -- verification ---------------------------------------------------------------------------


def component_problem(directory: Path, recipe: ComponentRecipe) -> str | None:
    """Why a materialized component directory cannot be reused, or ``None``."""
    return manifest_problem(directory, MANIFEST, {"digest": recipe.digest})


def pipeline_problem(directory: Path, spec: ModelSpec, recipes: Mapping[str, ComponentRecipe]) -> str | None:
    """Why a synthetic pipeline directory cannot be reused, or ``None``."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"{directory} has no {MANIFEST}"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{manifest_path} is unreadable: {exc}"
    if manifest.get("components") != {n: r.dirname for n, r in recipes.items()}:
        return f"{manifest_path} lists other components than {spec.name} needs"
    for name, recipe in recipes.items():
        link = directory / name
        if not link.is_dir():
            return f"{link} is missing or dangling"
        if problem := component_problem(link, recipe):
            return problem
    return None


# -- building -------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _build_model(recipe: ComponentRecipe, out: Path, device: str) -> None:
    comp = recipe.component
    cls = comp.load_class()
    config = recipe.component.config_for(recipe.size)
    _seed_everything(recipe.seed)
    # Built directly on the target device in bf16: a 12B transformer takes ~0.2 s on a GPU.
    with torch.device(device), _default_dtype(torch.bfloat16), torch.no_grad():
        if comp.library == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class(**config))
    if any(p.is_floating_point() and p.dtype != torch.bfloat16 for p in model.parameters()):
        model = model.to(torch.bfloat16)  # a class that ignored the default dtype
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    del model


def _build_component(recipe: ComponentRecipe, out: Path, device: str) -> None:
    comp = recipe.component
    if comp.role == "model":
        _build_model(recipe, out, device)
    elif comp.role == "tokenizer":
        generate_tokenizer(comp.generator or "", out, comp.config_for(recipe.size))
        comp.load_class().from_pretrained(out)  # a tokenizer that does not load is not written
    else:
        comp.load_class().from_config(comp.config_for(recipe.size)).save_pretrained(out)


def _manifest(recipe: ComponentRecipe, directory: Path, device: str) -> dict[str, Any]:
    return {
        "digest": recipe.digest,
        "recipe": recipe.identity(),
        "files": file_sizes(directory, MANIFEST),
        "marks": safetensors_marks(directory),
        "built_on": device,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {lib: library_version(lib) for lib in ("torch", "diffusers", "transformers", "tokenizers")},
    }


def ensure_component(components_dir: Path, recipe: ComponentRecipe, device: str) -> Path:
    """Materialize one component unless a verified copy exists; return its directory."""
    final = components_dir / recipe.dirname
    problem = component_problem(final, recipe) if final.exists() else "absent"
    if problem is None:
        mark_used(final)
        return final
    if problem != "absent":
        log.warning("quantgate: rebuilding synthetic component: %s", problem)
    with atomic_directory(final) as tmp:
        _build_component(recipe, tmp, device)
        atomic_write_json(tmp / MANIFEST, _manifest(recipe, tmp, device))
    return final


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def materialize(
    spec: ModelSpec,
    size: Size,
    cache_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Return a verified diffusers directory of ``spec`` with synthetic weights at ``size``.

    Builds (on ``device``; default: the GPU if there is one) whatever is missing or fails
    verification, under a cross-process lock, and reuses everything else.
    """
    device = device or default_device()
    root = synthetic_root(cache_dir)
    recipes = recipes_for(spec, size, seed)
    final = root / "pipelines" / pipeline_dirname(spec, size, recipes)
    with file_lock(root / ".lock"):
        problem = pipeline_problem(final, spec, recipes) if final.exists() else "absent"
        if problem is None:
            mark_used(final, *(root / "components" / r.dirname for r in recipes.values()))
            return final
        if problem != "absent":
            log.warning("quantgate: rebuilding synthetic pipeline: %s", problem)
        bar = tqdm(recipes.items(), desc=f"quantgate: synthetic {spec.name} ({size})", unit="component",
                   disable=not progress)
        for name, recipe in bar:
            bar.set_postfix_str(f"{name}: {recipe.component.cls}")
            ensure_component(root / "components", recipe, device)
        with atomic_directory(final) as tmp:
            for name, recipe in recipes.items():
                os.symlink(Path("..", "..", "components", recipe.dirname), tmp / name, target_is_directory=True)
            import diffusers

            atomic_write_json(tmp / "model_index.json", {**spec.model_index(), "_diffusers_version": diffusers.__version__})
            atomic_write_json(tmp / MANIFEST, {
                "model": spec.name, "size": size, "seed": seed,
                "components": {n: r.dirname for n, r in recipes.items()},
            })
    return final
