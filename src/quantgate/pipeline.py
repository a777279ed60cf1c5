"""Build one pipeline for a case (source -> scheme -> variant) and keep at most one loaded.

Loading always goes through ``Pipeline.from_pretrained(dir, quantization_config=...,
device_map=device)``: weights are quantized on the device that runs them, as a user's code
would. The cache holds one pipeline at a time; releasing it drops every reference quantgate
holds, frees the allocator's cache, and reports bytes still allocated above the baseline.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from packaging.version import Version

from quantgate import fingerprint
from quantgate.cases import Case
from quantgate.errors import PipelineBuildError, SourceInvalid, SourceUnavailable
from quantgate.frames import clear_exception_frames
from quantgate.measure.flops import forward_flops
from quantgate.measure.footprint import Footprint, module_footprint, reference_bytes
from quantgate.measure.memory import allocated_bytes, release_memory, synchronize
from quantgate.models import ModelSpec, get_model
from quantgate.models.families import DenoiserShape, get_family, vae_scale
from quantgate.models.sources import ResolvedSource, SourceContext, get_source
from quantgate.phases import Phases, maybe
from quantgate.quant.calibration import CalibrationSettings
from quantgate.schemes import Scheme, get_scheme
from quantgate.schemes.base import QuantizationRequest
from quantgate.variants import get_variant


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed torch_dtype to dtype (the old name still works, with a warning).
    import diffusers

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


@dataclass
class LoadedPipeline:
    """A pipeline on its device, with what was measured while loading it."""

    case_key: tuple[str, ...]
    spec: ModelSpec
    scheme: Scheme
    source: ResolvedSource
    device: str
    pipe: Any
    load_seconds: float
    footprints: dict[str, Footprint]
    denoiser_reference_bytes: int
    notes: dict[str, Any] = field(default_factory=dict)
    # Its structure as loaded: every test of its group must leave it so (``changes``).
    fingerprint_at_load: fingerprint.Fingerprint | None = None

    def changes(self) -> list[str]:
        """What differs from the pipeline as loaded (modules, tensors, hooks, adapters, compile state)."""
        if self.fingerprint_at_load is None or self.pipe is None:
            return []
        return fingerprint.differences(self.fingerprint_at_load, fingerprint.take(self.pipe))

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self._live(), self.spec.denoiser)

    @property
    def diffusers_pipeline(self) -> Any:
        """The live diffusers pipeline (for wrappers that time its stages); an error once released."""
        return self._live()

    @property
    def denoiser_footprint(self) -> Footprint:
        return self.footprints[self.spec.denoiser]

    def _live(self) -> Any:
        if self.pipe is None:
            raise RuntimeError(f"pipeline {self.case_key} was released")
        return self.pipe

    def denoiser_shape(self, case: Case, rows_per_image: int = 1) -> DenoiserShape:
        """The shape of one denoiser forward for ``case`` (``rows_per_image`` 2 under CFG)."""
        vae = self._vae_config()
        return DenoiserShape(batch=case.batch * rows_per_image, height=case.height, width=case.width,
                             text_tokens=case.max_sequence_length, vae_scale=vae_scale(vae))

    def _vae_config(self) -> dict[str, Any]:
        return json.loads((self.source.path / "vae" / "config.json").read_text())

    def denoiser_config(self) -> dict[str, Any]:
        """The denoiser's config.json as stored in the source directory."""
        return json.loads((self.source.path / self.spec.denoiser / "config.json").read_text())

    def denoiser_inputs(self, case: Case, seed: int = 0) -> dict[str, Any]:
        """Fixed seeded inputs for one denoiser forward at ``case``'s batch and resolution."""
        family = get_family(self.spec.family)
        generator = torch.Generator().manual_seed(seed)
        return family.denoiser_inputs(self.denoiser_config(), self.denoiser_shape(case), self.device,
                                      torch.bfloat16, generator)

    def denoiser_forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        """One forward of the denoiser (no autograd), returning its output tensor."""
        with torch.inference_mode():
            return self.denoiser(**inputs)[0]

    def flops(self, case: Case, scope: str) -> int:
        """Denoiser FLOPs of one call of ``scope``: one forward, or every step of a generation."""
        family = get_family(self.spec.family)
        model_class = self.spec.component(self.spec.denoiser).load_class()
        if scope == "transformer" or scope.startswith("transformer-"):  # e.g. transformer-no-low-rank
            return forward_flops(model_class, self.denoiser_config(), family, self.denoiser_shape(case))
        rows = family.rows_per_image(case.guidance_scale)
        per_step = forward_flops(model_class, self.denoiser_config(), family, self.denoiser_shape(case, rows))
        return per_step * case.num_inference_steps

    def generate(self, case: Case, prompts: list[str], seed: int = 0) -> np.ndarray:
        """Run the pipeline from prompt strings to images: an array (batch, H, W, 3) in [0, 1]."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.inference_mode():
            out = self._live()(prompt=prompts, generator=generator, output_type="np", **case.call_kwargs())
        return out.images

    def describe(self) -> dict[str, Any]:
        """Facts about this pipeline for a benchmark record."""
        return {
            "source_kind": self.source.kind,
            "source_path": str(self.source.path),
            "source_detail": self.source.detail,
            "scheme_info": self.scheme.describe(),
            "load_seconds": round(self.load_seconds, 3),
            "footprint_bytes": {name: fp.total_bytes for name, fp in self.footprints.items()},
            "denoiser": self.spec.denoiser,
            "denoiser_footprint": self.denoiser_footprint.as_dict(),
            "denoiser_bf16_reference_bytes": self.denoiser_reference_bytes,
            "pipeline_footprint_bytes": sum(fp.total_bytes for fp in self.footprints.values()),
            "notes": self.notes,
        }


def weights_identity(spec: ModelSpec, source: ResolvedSource) -> dict[str, Any]:
    """What decides a model's calibration statistics and quantized checkpoints: which weights these are."""
    return {"model": spec.name, "source": source.kind, "path": str(source.path), "detail": source.detail}


def _loads_on_cpu(variant: Any, scheme: Any) -> bool:
    # An offload variant places modules itself, so the pipeline loads on the CPU, unless the
    # scheme quantizes after loading (offline): that runs on the device, offload comes after.
    return variant.loads_on_cpu and scheme.offline_quantization is None


def component_quantization(config: Any, name: str) -> Any:
    """The quantization config a diffusers ``PipelineQuantizationConfig`` gives component ``name``, or None."""
    if config is None:
        return None
    mapping = getattr(config, "quant_mapping", None)
    if mapping is None:  # the quant_backend form: diffusers resolves it per component itself
        raise PipelineBuildError(f"{type(config).__name__} without quant_mapping cannot be applied to one component")
    return mapping.get(name)


def _load_denoiser_on_device(spec: ModelSpec, source: ResolvedSource, config: Any, device: str) -> Any:
    # The denoiser loads (and quantizes) straight onto the device while the rest of the pipeline
    # stays on the CPU: a quantized tensor subclass is never moved between devices (torchao
    # 0.18's Float8Tensor cannot be under torch 2.11: its aten.to fixes up storage aliasing
    # across devices, which torch refuses), and the bf16 weights never sit on the GPU whole.
    kwargs: dict[str, Any] = {_dtype_kwarg(): torch.bfloat16, "local_files_only": True, "use_safetensors": True,
                              "subfolder": spec.denoiser, "device_map": device}
    quantization = component_quantization(config, spec.denoiser)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return spec.component(spec.denoiser).load_class().from_pretrained(source.path, **kwargs)


def _install_lazy_hooks(pipe: Any) -> None:
    """Install now the hooks libraries would add at the first call, so the load fingerprint holds them.

    transformers 5 installs its output-capturing forward hooks on a text encoder's layers the
    first time it runs (and keeps them): state of the library, not a change a test made.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers < 5 captures outputs without hooks
        return
    for module in fingerprint.components(pipe).values():
        if isinstance(module, PreTrainedModel):
            try:
                maybe_install_capturing_hooks(module)
            except (AttributeError, KeyError, TypeError):  # a model without capture specs: nothing to install
                pass


def load_pipeline(case: Case, ctx: SourceContext, calibration: CalibrationSettings | None = None,
                  phases: Phases | None = None) -> LoadedPipeline:
    """Resolve the case's source, load it with its scheme on its device, apply its variant.

    ``calibration`` (prompts, samples, seed) is handed to schemes that calibrate; the call
    arguments (steps, guidance, resolution) come from the case. ``phases`` (a session's) is
    charged with the load and, apart, with a scheme's own quantization or calibration.
    """
    spec = get_model(case.model)
    scheme = get_scheme(case.scheme)
    variant = get_variant(case.variant)
    source = get_source(case.source).resolve(spec, ctx, case.device)
    # use_safetensors: a directory with only .bin pickles is refused, never unpickled.
    kwargs: dict[str, Any] = {_dtype_kwarg(): torch.bfloat16, "local_files_only": True, "use_safetensors": True,
                              "device_map": None if _loads_on_cpu(variant, scheme) else case.device}
    if calibration is not None:
        calibration = calibration.for_device(case.device, case.call_kwargs())
    identity = weights_identity(spec, source)
    request = QuantizationRequest(spec, (spec.denoiser,), device=case.device, identity=identity,
                                  cache_dir=ctx.cache_dir, calibration=calibration)
    plan = scheme.plan(request)
    if plan.config is not None:
        kwargs["quantization_config"] = plan.config
    start = time.perf_counter()
    for name, build in plan.components.items():  # components the scheme loads itself
        kwargs[name] = build(case.device)
    if variant.denoiser_on_device and _loads_on_cpu(variant, scheme) and spec.denoiser not in kwargs:
        kwargs[spec.denoiser] = _load_denoiser_on_device(spec, source, plan.config, case.device)
        if set(getattr(plan.config, "quant_mapping", None) or ()) <= {spec.denoiser}:
            kwargs.pop("quantization_config", None)  # nothing left for it to quantize
    pipe = spec.pipeline_class().from_pretrained(source.path, **kwargs)
    synchronize(case.device)
    load_seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    notes: dict[str, Any] = dict(plan.notes)
    if scheme.post_load is not None:
        start = time.perf_counter()
        with maybe(phases, "quantizing"):
            notes.update(scheme.post_load(pipe, request))
            synchronize(case.device)
        notes["post_load_seconds"] = round(time.perf_counter() - start, 3)
    notes.update(variant.apply(getattr(pipe, spec.denoiser)))
    if variant.prepare is not None:
        notes.update(variant.prepare(pipe, case.device))
    footprints = {name: module_footprint(module) for name, module in pipe.components.items()
                  if isinstance(module, torch.nn.Module)}
    denoiser = spec.component(spec.denoiser)
    reference = reference_bytes(denoiser.load_class(), source.path / spec.denoiser / "config.json")
    _install_lazy_hooks(pipe)
    loaded = LoadedPipeline(case.pipeline_key, spec, scheme, source, case.device, pipe, load_seconds,
                            footprints, reference, notes, fingerprint_at_load=fingerprint.take(pipe))
    # A library that logs an exception while this runs (bitsandbytes does, when an import inside
    # from_pretrained fails) keeps this frame alive through the record's traceback, and a frame
    # kept alive keeps its locals: none of them may hold the pipeline or its modules.
    pipe = kwargs = plan = request = None  # noqa: F841
    return loaded


@dataclass(frozen=True)
class Release:
    """What releasing a pipeline left behind on its device."""

    case_key: tuple[str, ...]
    device: str
    baseline_bytes: int | None  # allocated just before this pipeline loaded
    allocated_after_bytes: int | None
    failed_load: bool = False  # released after its load raised (nothing was loaded for a test)
    session_baseline_bytes: int | None = None  # allocated before the session's first load

    @property
    def leaked_bytes(self) -> int | None:
        """What this pipeline group left allocated: a leak is counted once, against the group that caused it."""
        if self.baseline_bytes is None or self.allocated_after_bytes is None:
            return None
        return max(0, self.allocated_after_bytes - self.baseline_bytes)

    @property
    def above_session_baseline_bytes(self) -> int | None:
        """What every group so far left allocated together (drift that no single group shows)."""
        if self.session_baseline_bytes is None or self.allocated_after_bytes is None:
            return None
        return max(0, self.allocated_after_bytes - self.session_baseline_bytes)


def _drop_exception_state() -> None:
    # pytest keeps the last failure in sys.last_* for post-mortem debugging; its frames
    # would keep a failed test's pipeline (and gigabytes of GPU memory) alive.
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)


class PipelineCache:
    """Keeps at most one loaded pipeline; tests that share a key reuse it."""

    def __init__(self, ctx: SourceContext, calibration: CalibrationSettings | None = None,
                 phases: Phases | None = None):
        self.ctx = ctx
        self.calibration = calibration
        self.phases = phases
        self.current: LoadedPipeline | None = None
        self.failures: dict[tuple[str, ...], str] = {}
        self.baselines: dict[str, int | None] = {}  # per device, before the session's first load
        self._before_load: int | None = None  # allocated before the current pipeline loaded
        # Loads that raised, checked for leaks like any release; the plugin takes them in teardown.
        self.failed_releases: list[Release] = []

    def get(self, case: Case) -> LoadedPipeline:
        """The pipeline for ``case``, loading it (and releasing any other) if needed."""
        if self.current is not None and self.current.case_key == case.pipeline_key:
            return self.current
        if case.pipeline_key in self.failures:
            raise PipelineBuildError(f"loading this pipeline already failed in this session: "
                                     f"{self.failures[case.pipeline_key]}")
        if self.current is not None:
            self.release()
        self._before_load = allocated_bytes(case.device)
        self.baselines.setdefault(case.device, self._before_load)
        try:
            with maybe(self.phases, "loading"):
                self.current = load_pipeline(case, self.ctx, self.calibration, self.phases)
        except (SourceUnavailable, SourceInvalid):
            raise  # cheap to re-check, and the plugin turns them into a skip / usage error
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            message = self._failed(case, exc)
            raise PipelineBuildError(f"{case.id}: {message}") from exc
        except BaseException as exc:  # a time budget's stop (pytest.fail from SIGALRM): the test reports it as is
            self._failed(case, exc)
            raise
        return self.current

    def _failed(self, case: Case, exc: BaseException) -> str:
        """Remember a failed load, free what it built and record what it left allocated."""
        message = f"{type(exc).__name__}: {exc}"
        self.failures[case.pipeline_key] = message
        # Frames of the failed load reference its half-built modules: clear them so the
        # memory is free for the next case; the traceback stays for pytest to render.
        clear_exception_frames(exc, detach=False)
        _drop_exception_state()
        release_memory(case.device)
        self.failed_releases.append(Release(case.pipeline_key, case.device, self._before_load,
                                            allocated_bytes(case.device), failed_load=True,
                                            session_baseline_bytes=self.baselines.get(case.device)))
        return message

    def release(self) -> Release | None:
        """Free the loaded pipeline; report what stayed allocated above the baseline."""
        if self.current is None:
            return None
        loaded, self.current = self.current, None
        key, device = loaded.case_key, loaded.device
        loaded.pipe = None  # a test holding the handle no longer holds the weights
        del loaded
        _drop_exception_state()
        release_memory(device)
        return Release(key, device, self._before_load, allocated_bytes(device),
                       session_baseline_bytes=self.baselines.get(device))
