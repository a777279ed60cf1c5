"""svdq-int4 / svdq-nvfp4: MIT HAN Lab's nunchaku engine with its pre-quantized FLUX.1 checkpoints.

nunchaku runs SVDQuant's W4A4 GEMMs with the low-rank branch fused into them. It is not on
PyPI (PyPI's ``nunchaku`` is an unrelated project): users install the wheel for their torch
and CUDA from https://github.com/nunchaku-tech/nunchaku/releases. It ships one safetensors
file per model and precision, named ``svdq-{int4|fp4}_r{rank}-{model}.safetensors``
(``nunchaku-tech/nunchaku-flux.1-schnell`` on the hub, formerly ``mit-han-lab/...``), with the
quantization config (precision, group size, rank) in the file's metadata.

What runs where (from nunchaku's own checks, ``nunchaku.utils.check_hardware_compatibility``
and its build targets): INT4 on sm_75/80/86/89 (Turing, Ampere, Ada), NVFP4 on sm_120/121
(consumer Blackwell); nothing on Hopper (sm_90 has no INT4 or FP4 tensor cores) nor on
data-center Blackwell (sm_100); FLUX.1 only, no SD3.5. Every case skips with that reason where
it cannot run; discovery, naming and gating are tested without the engine.

The transformer is loaded as ``NunchakuFluxTransformer2DModelV2`` (its quantized linears are
torch modules, so the footprint counts their real storage; the V1 class keeps them inside a
C++ module) and handed to ``FluxPipeline.from_pretrained`` as the ``transformer`` component.
LoRA uses the V1 class, which has nunchaku's LoRA API (see ``quantgate.nunchaku_lora``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from quantgate.errors import SourceUnavailable
from quantgate.models import ModelSpec
from quantgate.schemes.base import QuantizationPlan, QuantizationRequest, Requirements, Scheme

RELEASES = "https://github.com/nunchaku-tech/nunchaku/releases"
ENGINE_SPEC = ">=1.0"  # NunchakuFluxTransformer2DModelV2 arrived with 1.0
ENV_CHECKPOINT = "QUANTGATE_NUNCHAKU_CHECKPOINT"  # a checkpoint file, or a directory holding them
ENV_RANK = "QUANTGATE_NUNCHAKU_RANK"  # which rank to pick / the rank of a file not named by convention
HUB_ORGS = ("nunchaku-tech", "mit-han-lab")  # the current organisation first
FILENAME = re.compile(r"svdq-(?P<precision>int4|fp4|nvfp4)_r(?P<rank>\d+)-(?P<model>.+)\.safetensors")
DEFAULT_RANK = 32
FBCACHE_THRESHOLD = 0.12  # nunchaku's recommended residual_diff_threshold (2x at 50 steps)
SUPPORTED_MODELS = frozenset({"flux-schnell", "flux-dev"})


@dataclass(frozen=True)
class Precision:
    """One of nunchaku's 4-bit formats: what its files are called and which GPUs run it."""

    name: str  # "int4" | "nvfp4"
    file_tag: str  # in nunchaku's file names: "int4" | "fp4"
    metadata_dtype: str  # quantization_config["weight"]["dtype"] in the file's metadata
    capabilities: frozenset[tuple[int, int]]
    why: str


PRECISIONS: dict[str, Precision] = {
    "int4": Precision(
        "int4", "int4", "int4", frozenset({(7, 5), (8, 0), (8, 6), (8, 9)}),
        "nunchaku's INT4 W4A4 kernels are built for Turing, Ampere and Ada only; Hopper (sm_90) has no INT4 "
        "tensor cores and nunchaku refuses it"),
    "nvfp4": Precision(
        "nvfp4", "fp4", "fp4_e2m1_all", frozenset({(12, 0), (12, 1)}),
        "NVFP4 W4A4 runs on Blackwell FP4 tensor cores; nunchaku builds it for sm_120a/sm_121a (RTX 50, RTX PRO "
        "6000 Blackwell, DGX Spark) and refuses Hopper and data-center Blackwell (sm_100)"),
}
_FILE_TAGS = {"int4": "int4", "fp4": "nvfp4", "nvfp4": "nvfp4"}


# -- the engine ---------------------------------------------------------------------------------


def engine_problem() -> str | None:
    """Why the installed ``nunchaku`` cannot serve as the engine, or None."""
    try:
        installed = importlib.metadata.version("nunchaku")
    except importlib.metadata.PackageNotFoundError:
        return (f"nunchaku (the SVDQuant engine) is not installed; it is not on PyPI (PyPI's 'nunchaku' is an "
                f"unrelated project): install the wheel matching your torch and CUDA from {RELEASES}")
    try:
        recent = Version(installed) in SpecifierSet(ENGINE_SPEC, prereleases=True)
    except InvalidVersion:
        recent = True  # a local build: let the import decide
    if not recent:
        return (f"found nunchaku {installed}, which is older than the engine's 1.0 or PyPI's unrelated 'nunchaku': "
                f"install the engine's wheel (nunchaku{ENGINE_SPEC}) from {RELEASES}")
    try:
        import nunchaku
    except Exception as exc:  # a wheel built for another torch/CUDA fails here
        return f"nunchaku {installed} does not import ({type(exc).__name__}: {exc}): install the wheel built for " \
               f"your torch and CUDA from {RELEASES}"
    if not hasattr(nunchaku, "NunchakuFluxTransformer2DModelV2"):
        return (f"the installed 'nunchaku' {installed} ({getattr(nunchaku, '__file__', '?')}) has no "
                f"NunchakuFluxTransformer2DModelV2: it is not MIT HAN Lab's engine; install it from {RELEASES}")
    return None


def requirements(precision: str) -> Requirements:
    """What a nunchaku scheme of ``precision`` needs: the engine, a GPU it has kernels for, FLUX.1."""
    p = PRECISIONS[precision]
    return Requirements(devices=frozenset({"cuda"}), capabilities=p.capabilities, capability_note=p.why,
                        device_note=f"nunchaku's {precision} W4A4 kernels are CUDA-only",
                        models=SUPPORTED_MODELS, model_note="nunchaku has no SD3.5 support: no SD3 transformer "
                        "class and no pre-quantized SD3.5 checkpoint", probe=engine_problem)


# -- checkpoints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A nunchaku checkpoint file and what it holds."""

    path: Path
    precision: str  # "int4" | "nvfp4"
    rank: int
    model: str  # as the file names it, e.g. "flux.1-schnell"
    found_in: str  # "hub cache (repo@revision)" or "$QUANTGATE_NUNCHAKU_CHECKPOINT"
    inferred_from: str  # "file name" | "override"

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "precision": self.precision, "rank": self.rank, "model": self.model,
                "found_in": self.found_in, "inferred_from": self.inferred_from}


def parse_name(name: str) -> tuple[str, int, str] | None:
    """(precision, rank, model) from a file name ``svdq-{int4|fp4}_r{rank}-{model}.safetensors``."""
    match = FILENAME.fullmatch(name)
    if match is None:
        return None
    return _FILE_TAGS[match["precision"]], int(match["rank"]), match["model"]


def file_metadata(path: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` in a safetensors file's metadata (header only), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:
        return None
    raw = metadata.get("quantization_config")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def checkpoint_from_file(path: Path, precision: str | None = None, rank: int | None = None,
                         found_in: str = "") -> Checkpoint:
    """Describe a checkpoint file: precision and rank from its name, each overridable.

    A file not named by nunchaku's convention needs both overrides. When the file's metadata
    (what the engine reads) disagrees with the result, that is an error, not a guess.
    """
    parsed = parse_name(path.name)
    if parsed is None and (precision is None or rank is None):
        raise ValueError(f"{path.name} is not named svdq-{{int4|fp4}}_r{{rank}}-{{model}}.safetensors: give its "
                         f"precision and rank (${ENV_RANK} for the rank)")
    name_precision, name_rank, model = parsed if parsed is not None else (None, None, "?")
    final_precision = precision or name_precision
    final_rank = rank if rank is not None else name_rank
    if final_precision not in PRECISIONS:
        raise ValueError(f"unknown nunchaku precision {final_precision!r}; valid: {', '.join(PRECISIONS)}")
    overridden = (precision is not None and precision != name_precision) or (rank is not None and rank != name_rank)
    metadata = file_metadata(path)
    if metadata is not None:
        dtype = metadata.get("weight", {}).get("dtype")
        meta_rank = metadata.get("rank")
        if dtype is not None and dtype != PRECISIONS[final_precision].metadata_dtype:
            raise ValueError(f"{path} holds weights of dtype {dtype!r} by its metadata, not {final_precision}")
        if meta_rank is not None and int(meta_rank) != final_rank:
            raise ValueError(f"{path} has rank {meta_rank} by its metadata, not {final_rank}")
    return Checkpoint(path, final_precision, int(final_rank), model, found_in,
                      "override" if overridden else "file name")


def model_slug(spec: ModelSpec) -> str:
    """How nunchaku names a model: the hub repo's name in lower case (``flux.1-schnell``)."""
    return spec.hub_repo.split("/")[-1].lower()


def hub_snapshots(hub_cache: Path, spec: ModelSpec) -> Iterator[tuple[str, Path]]:
    """(repo@revision, snapshot directory) of nunchaku's repos for ``spec`` in the HF cache layout
    ``models--org--name/snapshots/<rev>/``; the revision ``refs/main`` names comes first."""
    for org in HUB_ORGS:
        repo = f"{org}/nunchaku-{model_slug(spec)}"
        base = hub_cache / f"models--{org}--nunchaku-{model_slug(spec)}"
        snapshots = base / "snapshots"
        if not snapshots.is_dir():
            continue
        main = base / "refs" / "main"
        revisions = [main.read_text().strip()] if main.is_file() else []
        revisions += sorted(p.name for p in snapshots.iterdir() if p.is_dir() and p.name not in revisions)
        for revision in revisions:
            yield f"{repo}@{revision}", snapshots / revision


def _pick(files: list[Path], rank: int | None) -> Path | None:
    ranked = sorted((parse_name(f.name)[1], f) for f in files if parse_name(f.name))  # type: ignore[index]
    if rank is not None:
        return next((f for r, f in ranked if r == rank), None)
    return next((f for r, f in ranked if r == DEFAULT_RANK), ranked[0][1] if ranked else None)


def find_checkpoint(spec: ModelSpec, precision: str, hub_cache: Path, configured: Path | None = None,
                    rank: int | None = None) -> Checkpoint | str:
    """The checkpoint of ``spec`` at ``precision``: ``configured`` (a file or a directory) first,
    else the HF hub cache. Returns the reason when there is none.

    ``rank`` picks among several files (default: rank 32, else the smallest) and is the rank
    of a configured file whose name does not follow nunchaku's convention.
    """
    p = PRECISIONS[precision]
    pattern = f"svdq-{p.file_tag}_r*-{model_slug(spec)}.safetensors"
    if configured is not None:
        if configured.is_file():
            parsed = parse_name(configured.name)
            if parsed is not None and parsed[0] != precision:
                return f"${ENV_CHECKPOINT} = {configured} is a {parsed[0]} checkpoint, not {precision}"
            if parsed is not None and parsed[2] != model_slug(spec):
                return (f"${ENV_CHECKPOINT} = {configured} is a checkpoint of {parsed[2]}, not of {spec.name} "
                        f"({model_slug(spec)}): point it at svdq-{p.file_tag}_r<rank>-{model_slug(spec)}.safetensors")
            try:
                return checkpoint_from_file(configured, precision, rank, f"${ENV_CHECKPOINT}")
            except ValueError as exc:
                return str(exc)
        if not configured.is_dir():
            return f"${ENV_CHECKPOINT} = {configured} does not exist"
        chosen = _pick([f for f in configured.glob(pattern) if f.is_file()], rank)
        if chosen is not None:
            try:  # a file whose metadata contradicts its name is a reason to skip, not a traceback
                return checkpoint_from_file(chosen, found_in=f"${ENV_CHECKPOINT} ({configured})")
            except ValueError as exc:
                return str(exc)
    looked = []
    for label, snapshot in hub_snapshots(hub_cache, spec):
        looked.append(label)
        # is_file follows the cache's symlinks into blobs/: a dangling link is an unfinished download
        chosen = _pick([f for f in snapshot.glob(pattern) if f.is_file()], rank)
        if chosen is not None:
            try:
                return checkpoint_from_file(chosen, found_in=f"hub cache ({label})")
            except ValueError as exc:
                return str(exc)
    repos = ", ".join(f"{org}/nunchaku-{model_slug(spec)}" for org in HUB_ORGS)
    where = f"snapshots of {', '.join(looked)}" if looked else f"no snapshot of {repos}"
    wanted = pattern.replace("_r*", f"_r{rank}" if rank is not None else "_r*")
    return (f"no nunchaku {precision} checkpoint {wanted} for {spec.name}: the Hugging Face cache {hub_cache} has "
            f"{where}{'' if configured is None else f' and {configured} has none'}; download one with `hf download "
            f"{HUB_ORGS[0]}/nunchaku-{model_slug(spec)} svdq-{p.file_tag}_r{rank or DEFAULT_RANK}-{model_slug(spec)}"
            f".safetensors` or set ${ENV_CHECKPOINT}=FILE")


def configured_checkpoint() -> tuple[Path | None, int | None]:
    """``$QUANTGATE_NUNCHAKU_CHECKPOINT`` and ``$QUANTGATE_NUNCHAKU_RANK`` as (path, rank)."""
    path = os.environ.get(ENV_CHECKPOINT)
    rank = os.environ.get(ENV_RANK)
    if rank is not None and not rank.strip().isdigit():
        raise ValueError(f"${ENV_RANK} must be a whole number, got {rank!r}")
    return (Path(path).expanduser() if path else None), (int(rank) if rank else None)


def locate(spec: ModelSpec, precision: str) -> Checkpoint | str:
    """The checkpoint for ``spec`` from the configured path and the HF cache, or why there is none."""
    from quantgate.models.sources import hub_cache_dir

    path, rank = configured_checkpoint()
    return find_checkpoint(spec, precision, hub_cache_dir(), path, rank)


# -- loading --------------------------------------------------------------------------------------


def load_transformer(checkpoint: Checkpoint, device: str, engine: str = "v2") -> Any:
    """nunchaku's FLUX transformer from ``checkpoint`` on ``device``: ``v2`` (torch modules) or
    ``v1`` (the class with the LoRA API)."""
    import torch

    if engine == "v2":
        from nunchaku import NunchakuFluxTransformer2DModelV2 as cls
    elif engine == "v1":
        from nunchaku import NunchakuFluxTransformer2dModel as cls
    else:
        raise ValueError(f"engine must be 'v1' or 'v2', got {engine!r}")
    return cls.from_pretrained(str(checkpoint.path), device=device, torch_dtype=torch.bfloat16)


def make_plan(precision: str):
    """The ``plan`` of a nunchaku scheme: find the checkpoint, load it as the transformer."""

    def plan(request: QuantizationRequest) -> QuantizationPlan:
        source = request.identity.get("source")
        if source not in ("hub", "path"):
            # The checkpoint holds the real FLUX.1 weights: against another source's bf16 the
            # quality comparisons would compare different models.
            raise SourceUnavailable(f"svdq-{precision} loads nunchaku's pre-quantized {request.spec.name} checkpoint "
                                    f"(the real weights), so it runs only with the real pipeline (--quantgate-source "
                                    f"hub or path), not {source}")
        found = locate(request.spec, precision)
        if isinstance(found, str):
            raise SourceUnavailable(found)
        notes = {"nunchaku": {"checkpoint": found.describe(), "engine": "NunchakuFluxTransformer2DModelV2",
                              "adaLN": "W4A16 (AWQ, group 64) as nunchaku stores it"}}
        return QuantizationPlan(None, notes=notes,
                                components={request.spec.denoiser: lambda device: load_transformer(found, device)})

    return plan


def enable_first_block_cache(pipe: Any, threshold: float = FBCACHE_THRESHOLD) -> dict[str, Any]:
    """nunchaku's first-block cache on this pipeline's prompt-to-image calls only.

    nunchaku's adapter patches the pipeline *class*; here the instance gets its own subclass
    (other pipelines of the session stay untouched), and the transformer runs cached only
    inside a pipeline call, so a bare transformer forward (the transformer-scope benchmark) is
    the plain nunchaku forward: the cache changes the number of block evaluations per image,
    not one forward.
    """
    from nunchaku.caching.diffusers_adapters.flux_v2 import apply_cache_on_transformer
    from nunchaku.caching.fbcache import cache_context, create_cache_context

    transformer = pipe.transformer
    apply_cache_on_transformer(transformer, residual_diff_threshold=threshold)
    cached, plain = transformer.forward, transformer._original_forward
    transformer.forward = plain
    base = type(pipe)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        transformer.forward = cached
        try:
            with cache_context(create_cache_context()):
                return base.__call__(self, *args, **kwargs)
        finally:
            transformer.forward = plain

    pipe.__class__ = type(f"FirstBlockCached{base.__name__}", (base,), {"__call__": __call__})
    return {"first_block_cache": {"residual_diff_threshold": threshold,
                                  "adapter": "nunchaku.caching.diffusers_adapters.flux_v2.apply_cache_on_transformer",
                                  "scope": "prompt-to-image calls; a bare transformer forward runs uncached"}}


def _scheme(precision: str, fbcache: bool) -> Scheme:
    p = PRECISIONS[precision]
    name = f"svdq-{precision}" + ("-fbcache" if fbcache else "")
    summary = (f"nunchaku SVDQuant W4A4 {precision} + rank-32 low-rank branch (fused kernels), pre-quantized FLUX.1 "
               f"checkpoint svdq-{p.file_tag}_r32-*; adaLN W4A16")
    return Scheme(
        name=name,
        summary=summary + (f"; first-block cache (threshold {FBCACHE_THRESHOLD})" if fbcache else ""),
        backend="nunchaku",
        requires=requirements(precision),
        plan=make_plan(precision),
        post_load=(lambda pipe, request: enable_first_block_cache(pipe)) if fbcache else None,
        markers=("nunchaku", "svdquant"),
        details={"config": f"NunchakuFluxTransformer2DModelV2.from_pretrained(svdq-{p.file_tag}_r{{rank}}-{{model}}"
                           f".safetensors)" + (", first-block cache" if fbcache else ""),
                 "engine": f"nunchaku{ENGINE_SPEC} from {RELEASES}",
                 "checkpoint_search": f"${ENV_CHECKPOINT}, then the HF cache ({', '.join(HUB_ORGS)})"},
    )


SCHEMES = [_scheme("int4", False), _scheme("nvfp4", False), _scheme("int4", True), _scheme("nvfp4", True)]
