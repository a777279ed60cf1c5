"""Weight sources. Every source resolves to a local diffusers-format directory, so real and
synthetic weights take exactly the same loading path (``Pipeline.from_pretrained(dir)``).

- ``hub``: the Hugging Face cache, offline only; never downloads.
- ``path``: a directory the user names (``--quantgate-path MODEL=DIR``).
- ``synthetic``: the full-size architecture with seeded random weights, cached on disk.
- ``tiny``: the same families with tiny configs, for the CPU tier and CI.
- ``auto``: ``hub`` if the weights are cached, else ``synthetic`` on a GPU; ``tiny`` on CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.errors import SourceInvalid, SourceUnavailable, UnknownNameError
from quantgate.models.registry import ComponentSpec, ModelSpec, Size
from quantgate.models.synthetic import materialize

SOURCE_NAMES: tuple[str, ...] = ("hub", "path", "synthetic", "tiny")
AUTO = "auto"


@dataclass(frozen=True)
class SourceContext:
    """Where sources look: quantgate's cache, user directories, the seed of synthetic weights."""

    cache_dir: Path
    paths: Mapping[str, Path] = field(default_factory=dict)  # model name -> user directory
    seed: int = 0
    hub_cache: Path | None = None  # default: HF_HUB_CACHE / HF_HOME / huggingface_hub's default


@dataclass(frozen=True)
class ResolvedSource:
    """A usable diffusers directory and where it came from."""

    kind: str
    path: Path
    size: Size
    detail: str


def hub_cache_dir(ctx: SourceContext | None = None) -> Path:
    """The Hugging Face hub cache directory, read from the environment at call time."""
    if ctx is not None and ctx.hub_cache is not None:
        return Path(ctx.hub_cache)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (reads only its header), or None.

    A copy that stopped early or a file of another format is named here, before a loader
    fails deep inside safetensors or diffusers.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                return f"{path} is not a safetensors file or is truncated (header says {length} bytes, file has {size})"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return f"{path} is unreadable: {exc}"
    except (ValueError, UnicodeDecodeError):
        return f"{path} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{path} is truncated: {size} bytes, its header describes {expected} (copy or download it again)"
    return None


def _weights_problem(directory: Path) -> str | None:
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
        try:
            shards = set(json.loads(index[0].read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            return f"{index[0]} is unreadable: {exc}"
        for shard in sorted(shards):
            if not (directory / shard).is_file():
                return f"{directory / shard} is missing (listed in {index[0].name})"
            if problem := safetensors_problem(directory / shard):
                return problem
        return None
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if files:
        return next((problem for f in files if (problem := safetensors_problem(f))), None)
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    if pickles:
        return (f"{directory} holds only pickle weights ({', '.join(pickles)}); quantgate loads safetensors only: "
                "convert them with save_pretrained(safe_serialization=True)")
    return f"{directory} has no *.safetensors weights"


def _config_class_problem(config_path: Path, comp: ComponentSpec) -> str | None:
    """A component config written for another class (e.g. the other model family's transformer)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{config_path} is unreadable: {exc}"
    if not isinstance(config, dict):
        return f"{config_path} is not a JSON object"
    named = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if named is not None and named != comp.cls:
        return f"{config_path} is a {named} config, but {comp.name} must be a {comp.cls}"
    return None


def _component_problem(directory: Path, comp: ComponentSpec) -> str | None:
    if not directory.is_dir():
        return f"{directory} is missing"
    if comp.role == "model":
        if not (directory / "config.json").is_file():
            return f"{directory / 'config.json'} is missing"
        return _config_class_problem(directory / "config.json", comp) or _weights_problem(directory)
    if comp.role == "scheduler":
        config = directory / "scheduler_config.json"
        return _config_class_problem(config, comp) if config.is_file() else f"{config} is missing"
    has_files = (directory / "tokenizer.json").is_file() or (directory / "spiece.model").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )
    if has_files:
        return None
    return f"{directory} has no tokenizer files (tokenizer.json, spiece.model or vocab.json+merges.txt)"


def pipeline_dir_problems(directory: Path, spec: ModelSpec) -> list[str]:
    """Everything that keeps ``directory`` from loading as ``spec``'s pipeline (empty if usable)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    index_path = directory / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        return [f"{index_path} is missing"]
    except (OSError, ValueError) as exc:
        return [f"{index_path} is unreadable: {exc}"]
    problems = []
    if index.get("_class_name") != spec.pipeline:
        problems.append(f"{index_path} names pipeline {index.get('_class_name')!r}, but {spec.name} is a {spec.pipeline}")
    for comp in spec.components:
        if comp.name not in index:
            problems.append(f"{index_path} has no entry for component {comp.name!r}")
            continue
        entry = index[comp.name]
        if isinstance(entry, list) and len(entry) == 2 and entry[1] != comp.cls:
            problems.append(f"{index_path} makes {comp.name} a {entry[1]}, but {spec.name} needs a {comp.cls}")
            continue
        if problem := _component_problem(directory / comp.name, comp):
            problems.append(problem)
    return problems


class Source:
    """A way to get a model's weights onto this machine."""

    name: str = ""
    size: Size = "full"

    def unavailable(self, spec: ModelSpec, ctx: SourceContext) -> str | None:
        """A cheap check at collection time: why this source has nothing for ``spec``, or None."""
        return None

    def resolve(self, spec: ModelSpec, ctx: SourceContext, device: str) -> ResolvedSource:
        """The directory to load; raises SourceUnavailable (skip) or SourceInvalid (usage error)."""
        raise NotImplementedError


class HubSource(Source):
    name = "hub"

    def _snapshot(self, spec: ModelSpec, ctx: SourceContext) -> Path:
        from huggingface_hub import snapshot_download

        cache = hub_cache_dir(ctx)
        try:
            return Path(snapshot_download(spec.hub_repo, local_files_only=True, cache_dir=cache))
        except Exception as exc:  # LocalEntryNotFoundError and friends; never a download
            raise SourceUnavailable(
                f"{spec.hub_repo} is not in the Hugging Face cache at {cache} and quantgate never downloads "
                f"during a run: fetch it once on this runner (`hf download {spec.hub_repo}`), or use "
                f"--quantgate-source synthetic ({type(exc).__name__})"
            ) from None

    def unavailable(self, spec: ModelSpec, ctx: SourceContext) -> str | None:
        try:
            snapshot = self._snapshot(spec, ctx)
        except SourceUnavailable as exc:
            return str(exc)
        problems = pipeline_dir_problems(snapshot, spec)
        return f"the cached snapshot of {spec.hub_repo} is incomplete: {problems[0]}" if problems else None

    def resolve(self, spec: ModelSpec, ctx: SourceContext, device: str) -> ResolvedSource:
        snapshot = self._snapshot(spec, ctx)
        problems = pipeline_dir_problems(snapshot, spec)
        if problems:
            raise SourceUnavailable(f"the cached snapshot of {spec.hub_repo} is incomplete: {problems[0]}")
        return ResolvedSource("hub", snapshot, "full", f"{spec.hub_repo}@{snapshot.name}")


class PathSource(Source):
    name = "path"

    def _directory(self, spec: ModelSpec, ctx: SourceContext) -> Path:
        if spec.name not in ctx.paths:
            raise SourceInvalid(f"--quantgate-source path needs a directory for {spec.name}: "
                                f"pass --quantgate-path {spec.name}=DIR")
        return Path(ctx.paths[spec.name]).expanduser()

    def resolve(self, spec: ModelSpec, ctx: SourceContext, device: str) -> ResolvedSource:
        directory = self._directory(spec, ctx)
        problems = pipeline_dir_problems(directory, spec)
        if problems:
            raise SourceInvalid(f"--quantgate-path {spec.name}={directory} is not a usable {spec.pipeline} "
                                f"directory: " + "; ".join(problems))
        return ResolvedSource("path", directory.resolve(), "full", str(directory))


class SyntheticSource(Source):
    def __init__(self, name: str, size: Size):
        self.name, self.size = name, size

    def resolve(self, spec: ModelSpec, ctx: SourceContext, device: str) -> ResolvedSource:
        # Full-size weights are generated on the GPU that runs the case; tiny ones on the CPU,
        # so the tiny tier's weights are identical on every machine.
        build_on = device if self.size == "full" else "cpu"
        path = materialize(spec, self.size, ctx.cache_dir, seed=ctx.seed, device=build_on)
        return ResolvedSource(self.name, path, self.size, f"seed {ctx.seed}, {path.name}")


SOURCES: dict[str, Source] = {
    "hub": HubSource(),
    "path": PathSource(),
    "synthetic": SyntheticSource("synthetic", "full"),
    "tiny": SyntheticSource("tiny", "tiny"),
}


def get_source(name: str) -> Source:
    """The registered source called ``name``."""
    try:
        return SOURCES[name]
    except KeyError:
        raise UnknownNameError("source", name, [*SOURCES, AUTO]) from None


def choose_source(requested: str, spec: ModelSpec, device_type: str, ctx: SourceContext) -> str:
    """Turn ``auto`` into a concrete source for ``spec`` on ``device_type``; pass others through."""
    if requested != AUTO:
        get_source(requested)
        return requested
    if device_type == "cpu":
        return "tiny"  # full-size weights on a CPU would take hours per image
    return "hub" if SOURCES["hub"].unavailable(spec, ctx) is None else "synthetic"
