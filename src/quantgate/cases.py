"""Cases: one point of the test matrix (model, source, scheme, variant, batch, device) and
the generation settings it runs with. Pure data, built from the user's selection."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from quantgate.models import ModelSpec, get_model
from quantgate.models.sources import SOURCES

# A tier is a marker (-m gpu / -m cpu) and the device its cases run on.
TIERS: dict[str, str] = {"gpu": "cuda", "cpu": "cpu"}


@dataclass(frozen=True)
class Case:
    """One cell of the matrix."""

    model: str
    source: str
    scheme: str
    variant: str
    batch: int
    device: str  # "cuda" or "cpu"
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    max_sequence_length: int

    @property
    def tier(self) -> str:
        return "gpu" if self.device == "cuda" else "cpu"

    @property
    def pipeline_key(self) -> tuple[str, str, str, str, str]:
        """Cases with equal keys share one loaded pipeline."""
        return (self.device, self.model, self.source, self.scheme, self.variant)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.source}-{self.scheme}-{self.variant}-b{self.batch}-{self.device}"

    def gate_attrs(self, hardware: str) -> dict[str, Any]:
        """The attributes the selectors of fixtures/gates/ match against (``family``: the model's)."""
        return {"model": self.model, "family": get_model(self.model).family, "source": self.source,
                "scheme": self.scheme, "variant": self.variant, "batch": self.batch, "hardware": hardware}

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the pipeline's ``__call__`` (besides prompts and generator)."""
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id, "tier": self.tier}


@dataclass(frozen=True)
class Selection:
    """What the user asked to run."""

    models: Sequence[str]
    schemes: Sequence[str]
    variants: Sequence[str] = ("eager",)
    batches: Sequence[int] = (1,)
    source: str = "auto"
    steps: int | None = None
    resolution: tuple[int, int] | None = None  # (height, width)


def make_case(spec: ModelSpec, source: str, scheme: str, variant: str, batch: int, device: str,
              selection: Selection) -> Case:
    """A case with the model card's defaults at the source's size, then the user's overrides."""
    defaults = spec.defaults_for(SOURCES[source].size)
    height, width = selection.resolution or (defaults["height"], defaults["width"])
    return Case(
        model=spec.name, source=source, scheme=scheme, variant=variant, batch=batch, device=device,
        num_inference_steps=selection.steps or defaults["num_inference_steps"],
        guidance_scale=float(defaults["guidance_scale"]),
        height=height, width=width, max_sequence_length=defaults["max_sequence_length"],
    )


def build_cases(selection: Selection, choose_source: Callable[[ModelSpec, str], str],
                tiers: Sequence[str] = ("gpu", "cpu"), per_pipeline: bool = False) -> list[Case]:
    """Every case of ``selection`` in each tier.

    The GPU tier uses the requested source (``auto`` resolved by ``choose_source``); the CPU
    tier always uses ``tiny``. With ``per_pipeline``, only the smallest batch is kept: for
    properties of a loaded pipeline (its footprint) the batch size does not matter.
    """
    batches = [min(selection.batches)] if per_pipeline else list(selection.batches)
    cases = []
    for tier in tiers:
        device = TIERS[tier]
        for model in selection.models:
            spec = get_model(model)
            source = choose_source(spec, device) if tier == "gpu" else "tiny"
            for scheme in selection.schemes:
                for variant in selection.variants:
                    for batch in batches:
                        cases.append(make_case(spec, source, scheme, variant, batch, device, selection))
    return cases


def plan_cases(plan: Any, test: str | None, selection: Selection, choose_source: Callable[[ModelSpec, str], str],
               tiers: Sequence[str] = ("gpu", "cpu"), per_pipeline: bool = False) -> list[Case]:
    """The cases ``plan`` (a ``quantgate.plans.Plan``) selects for test function ``test`` (None:
    for any test) in ``tiers``, in the plan's order, each once.

    ``selection`` gives the source and the steps/resolution overrides. With ``per_pipeline``
    only the smallest batch of each model, scheme and variant is kept (a property of the loaded
    pipeline, such as its footprint, does not depend on the batch).
    """
    found: dict[str, Case] = {}
    for tier in tiers:
        device = TIERS[tier]
        for entry in plan.entries:
            if tier not in entry.tiers or (test is not None and not entry.selects_test(test)):
                continue
            for model in entry.models:
                spec = get_model(model)
                source = choose_source(spec, device) if tier == "gpu" else "tiny"
                for scheme in entry.schemes:
                    for variant in entry.variants:
                        for batch in entry.batches:
                            case = make_case(spec, source, scheme, variant, batch, device, selection)
                            found.setdefault(case.id, case)
    cases = list(found.values())
    if per_pipeline:
        smallest: dict[tuple, Case] = {}
        for case in cases:
            key = case.pipeline_key
            if key not in smallest or case.batch < smallest[key].batch:
                smallest[key] = case
        cases = [c for c in cases if smallest[c.pipeline_key] is c]
    return cases


def selector_vocabulary() -> dict[str, list[Any]]:
    """The valid value of each attribute a gates selector matches, from the registries (``family``:
    the families of the registered models)."""
    from quantgate.hardware import HARDWARE_CLASSES
    from quantgate.models import model_names
    from quantgate.schemes import scheme_names
    from quantgate.variants import VARIANTS

    return {"model": model_names(), "family": sorted({get_model(m).family for m in model_names()}),
            "scheme": scheme_names(), "source": list(SOURCES), "variant": list(VARIANTS),
            "hardware": list(HARDWARE_CLASSES)}


def case_attrs_from_id(case_id: str) -> dict[str, Any] | None:
    """The attributes behind a case id (the inverse of ``Case.id``), read against the
    registries, whose names may hold hyphens; None if no registered combination makes it."""
    vocabulary = selector_vocabulary()
    for model in vocabulary["model"]:
        for source in vocabulary["source"]:
            prefix = f"{model}-{source}-"
            if not case_id.startswith(prefix):
                continue
            for scheme in vocabulary["scheme"]:
                for variant in vocabulary["variant"]:
                    found = re.fullmatch(rf"{re.escape(scheme)}-{re.escape(variant)}-b(\d+)-(\w+)",
                                         case_id[len(prefix):])
                    if found:
                        return {"model": model, "source": source, "scheme": scheme, "variant": variant,
                                "batch": int(found.group(1)), "device": found.group(2)}
    return None
