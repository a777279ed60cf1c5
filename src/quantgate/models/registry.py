"""The model registry: one JSON file per model under ``data/``, shared components under
``data/components/``. Adding a model is adding a file; nothing else in the tree changes.

A model file names its diffusers pipeline class, hub repo, generation defaults (from the
model card) and its components. A component either spells out ``library``/``class``/
``role``/``config`` or ``use``s a shared component file and overrides parts of it. A
component's ``tiny`` mapping overrides its config for the tiny tier. ``extends`` makes a
model a deep-merged variant of another (FLUX.1-dev is schnell plus a guidance embedding).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from quantgate.errors import ConfigFileError, UnknownNameError

Size = Literal["full", "tiny"]
SIZES: tuple[str, ...] = ("full", "tiny")
ROLES: tuple[str, ...] = ("model", "tokenizer", "scheduler")
DATA_DIR = Path(__file__).with_name("data")


@dataclass(frozen=True)
class ComponentSpec:
    """One pipeline component (``transformer``, ``text_encoder_2``, ``tokenizer`` ...)."""

    name: str
    library: str  # "diffusers" or "transformers"
    cls: str
    role: str  # "model" | "tokenizer" | "scheduler"
    config: Mapping[str, Any]
    tiny: Mapping[str, Any] = field(default_factory=dict)
    generator: str | None = None  # how a tokenizer is generated locally
    description: str = ""

    def config_for(self, size: Size) -> dict[str, Any]:
        """The component's config at ``size`` (tiny overrides applied over the full config)."""
        config = copy.deepcopy(dict(self.config))
        if size == "tiny":
            config.update(copy.deepcopy(dict(self.tiny)))
        return config

    def load_class(self) -> type:
        """Import the component's class from its library."""
        return getattr(importlib.import_module(self.library), self.cls)


@dataclass(frozen=True)
class ModelSpec:
    """A model the suite can build: its pipeline, components and generation defaults."""

    name: str
    description: str
    family: str
    pipeline: str
    hub_repo: str
    denoiser: str
    # Regex (full match) of the denoiser's linears that see one row per image (adaLN
    # modulation, timestep/text embedders): GEMV-shaped, served differently by some schemes.
    per_image_linears: str
    defaults: Mapping[str, Any]
    tiny_defaults: Mapping[str, Any]
    components: tuple[ComponentSpec, ...]

    def component(self, name: str) -> ComponentSpec:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise UnknownNameError(f"{self.name} component", name, [c.name for c in self.components])

    def defaults_for(self, size: Size) -> dict[str, Any]:
        """Generation defaults (steps, guidance, resolution, max sequence length) at ``size``."""
        out = dict(self.defaults)
        if size == "tiny":
            out.update(self.tiny_defaults)
        return out

    def pipeline_class(self) -> type:
        """The diffusers pipeline class (imported lazily: diffusers is slow to import)."""
        return getattr(importlib.import_module("diffusers"), self.pipeline)

    def model_index(self) -> dict[str, Any]:
        """The ``model_index.json`` a diffusers directory of this model carries."""
        index: dict[str, Any] = {"_class_name": self.pipeline}
        for comp in self.components:
            index[comp.name] = [comp.library, comp.cls]
        return index


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigFileError(path, f"cannot read model data: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(path, "expected a JSON object")
    return data


_MODEL_KEYS = {"name", "extends", "description", "family", "pipeline", "hub_repo", "denoiser", "per_image_linears",
               "defaults", "tiny_defaults", "components"}
_COMPONENT_KEYS = {"use", "library", "class", "role", "config", "tiny", "generator", "description"}
_DEFAULT_KEYS = {"num_inference_steps", "guidance_scale", "height", "width", "max_sequence_length"}


def _component(name: str, raw: Mapping[str, Any], shared: Mapping[str, dict[str, Any]], path: Path) -> ComponentSpec:
    unknown = set(raw) - _COMPONENT_KEYS
    if unknown:
        raise ConfigFileError(path, f"unknown keys {sorted(unknown)}", key=f"components.{name}")
    merged: dict[str, Any] = {}
    if "use" in raw:
        if raw["use"] not in shared:
            raise ConfigFileError(path, f"uses unknown shared component {raw['use']!r} "
                                  f"(have: {', '.join(sorted(shared))})", key=f"components.{name}")
        merged = copy.deepcopy(shared[raw["use"]])
    merged = _deep_merge(merged, {k: v for k, v in raw.items() if k != "use"})
    for required in ("library", "class", "role", "config"):
        if required not in merged:
            raise ConfigFileError(path, f"missing {required!r}", key=f"components.{name}")
    if merged["role"] not in ROLES:
        raise ConfigFileError(path, f"role must be one of {ROLES}", key=f"components.{name}.role")
    if merged["role"] == "tokenizer" and not merged.get("generator"):
        raise ConfigFileError(path, "a tokenizer needs a 'generator'", key=f"components.{name}")
    return ComponentSpec(
        name=name,
        library=merged["library"],
        cls=merged["class"],
        role=merged["role"],
        config=merged["config"],
        tiny=merged.get("tiny", {}),
        generator=merged.get("generator"),
        description=merged.get("description", ""),
    )


def load_models(data_dir: Path = DATA_DIR) -> dict[str, ModelSpec]:
    """Read every model file in ``data_dir`` into a name -> ModelSpec mapping."""
    shared = {p.stem: _read_json(p) for p in sorted((data_dir / "components").glob("*.json"))}
    raw = {p.stem: (p, _read_json(p)) for p in sorted(data_dir.glob("*.json"))}

    def resolved(stem: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        path, data = raw[stem]
        if "extends" not in data:
            return data
        parent = data["extends"]
        if parent not in raw or parent in seen:
            raise ConfigFileError(path, f"extends unknown or circular model {parent!r}", key="extends")
        merged = _deep_merge(resolved(parent, (*seen, stem)), data)
        merged.pop("extends", None)
        return merged

    models: dict[str, ModelSpec] = {}
    for stem, (path, _) in raw.items():
        data = resolved(stem)
        unknown = set(data) - _MODEL_KEYS
        if unknown:
            raise ConfigFileError(path, f"unknown keys {sorted(unknown)}")
        if data.get("name") != stem:
            raise ConfigFileError(path, f"name must equal the file name {stem!r}", key="name")
        bad_defaults = set(data.get("defaults", {})) - _DEFAULT_KEYS
        if bad_defaults:
            raise ConfigFileError(path, f"unknown defaults {sorted(bad_defaults)}", key="defaults")
        components = tuple(_component(n, c, shared, path) for n, c in data["components"].items())
        spec = ModelSpec(
            name=stem,
            description=data.get("description", ""),
            family=data["family"],
            pipeline=data["pipeline"],
            hub_repo=data["hub_repo"],
            denoiser=data["denoiser"],
            per_image_linears=data["per_image_linears"],
            defaults=data["defaults"],
            tiny_defaults=data.get("tiny_defaults", {}),
            components=components,
        )
        spec.component(spec.denoiser)  # the denoiser must be one of the components
        try:
            re.compile(spec.per_image_linears)
        except re.error as exc:
            raise ConfigFileError(path, f"not a regular expression: {exc}", key="per_image_linears") from None
        models[stem] = spec
    return models


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, ModelSpec]:
    return load_models()


def model_names() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_registry())


def get_model(name: str) -> ModelSpec:
    """The registered model called ``name``; an unknown name lists the valid ones."""
    try:
        return _registry()[name]
    except KeyError:
        raise UnknownNameError("model", name, _registry()) from None
