"""The pytest side of LoRA gates (loaded by ``quantgate.plugin``): option, parametrization, fixtures.

- ``--quantgate-lora [MODEL=]SOURCE`` (repeatable, comma-separated): a user's LoRA file or
  ``hub:ORG/REPO[/FILE]``; tests taking ``lora`` run once with the synthetic LoRA of the
  case's model and once per user LoRA (ids end in ``-synthetic`` / ``-user-<name>``).
- ``lora_adapters``: LoRA operations on the case's pipeline; skips with the reason when the
  scheme cannot take a LoRA; on teardown every LoRA is unloaded, and a pipeline whose weights
  may have changed (fused into, re-quantized; a failed load) is reloaded before the next test.
  Tests using it run after the tests that only read the pipeline (``quantgate.ordering``).
- ``lora``: the LoRA file a test applies. ``lora_reference``: this session's bf16 eager
  outputs with and without the same LoRA, which quantized cases are compared with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from quantgate.applicability import is_baseline
from quantgate.cases import Case
from quantgate.errors import SourceInvalid, SourceUnavailable
from quantgate.lora import (
    Adapters,
    LoraFile,
    LoraMismatch,
    LoraUnsupported,
    SyntheticLoraRecipe,
    UserLora,
    combine_loras,
    lora_unsupported_reason,
    make_synthetic_lora,
    parse_lora_option,
    resolve_user_lora,
)
from quantgate.models import get_model, model_names
from quantgate.models.sources import hub_cache_dir
from quantgate.pipeline import LoadedPipeline
from quantgate.schemes import get_scheme

SYNTHETIC = "synthetic"
_USER_LORAS = pytest.StashKey[list[UserLora]]()
_OUTPUTS = pytest.StashKey[dict[tuple, Any]]()
_REFUSED = pytest.StashKey[dict[tuple, str]]()  # pipeline key -> why its layers refused a LoRA
# Exceptions peft's merge raises for a layer type it cannot fuse into (a torchao config it
# cannot re-apply per layer, int4 weights, a weight without dequantize).
_FUSE_REFUSALS = (ValueError, NotImplementedError, TypeError)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantgate")
    help_text = ("a LoRA to gate besides the synthetic one: [MODEL=]PATH (a .safetensors file or a directory "
                 "holding one) or [MODEL=]hub:ORG/REPO[/FILE] from the HF cache (repeatable, comma-separated)")
    group.addoption("--quantgate-lora", dest="quantgate_lora", action="append", default=[], metavar="[MODEL=]SOURCE",
                    help=help_text)
    parser.addini("quantgate_lora", help_text, type="linelist", default=[])


def pytest_configure(config: pytest.Config) -> None:
    from quantgate import options

    values = list(config.getoption("quantgate_lora") or []) or list(config.getini("quantgate_lora"))
    if not values and (planned := options.value(config, "lora")):  # a plan's lora = "SOURCE ..." (space-separated)
        values = planned.split()
    try:
        entries = parse_lora_option(values, model_names())
        for entry in entries:
            if not entry.source.startswith("hub:"):
                resolve_user_lora(entry, hub_cache_dir())  # a wrong path stops the run before collection
    except SourceInvalid as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_USER_LORAS] = entries
    config.stash[_OUTPUTS] = {}
    config.stash[_REFUSED] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lora_source" not in metafunc.fixturenames:
        return
    entries = metafunc.config.stash[_USER_LORAS]
    metafunc.parametrize("lora_source", [SYNTHETIC, *entries],
                         ids=[SYNTHETIC, *(f"user-{e.id}" for e in entries)])


class LoraKit:
    """LoRA operations on one case's pipeline, turning 'cannot' into a skip that says why."""

    def __init__(self, run: Any, case: Case, loaded: LoadedPipeline, refused: dict[tuple, str]):
        self.run, self.case, self.loaded, self.refused = run, case, loaded, refused
        self.spec = get_model(case.model)
        self.scheme = get_scheme(case.scheme)
        self.adapters = Adapters(loaded.pipe, self.spec.denoiser, self.scheme, case.model)

    def release(self) -> None:
        """Drop every reference to the pipeline (the plugin measures what its release frees)."""
        self.adapters.pipe = self.adapters.native = self.loaded = None

    def synthetic(self, index: int = 0) -> LoraFile:
        """The ``index``-th synthetic LoRA of this model (seed = session seed + index)."""
        recipe = SyntheticLoraRecipe(seed=self.run.ctx.seed + index)
        return make_synthetic_lora(self.spec, self.loaded.source.path, self.run.ctx.cache_dir, recipe,
                                   device=self.case.device)

    def combined(self, parts: list[tuple[LoraFile, float]]) -> LoraFile:
        """One LoRA equal to ``parts`` at their strengths (see ``combine_loras``)."""
        return combine_loras(self.spec, parts, self.run.ctx.cache_dir)

    def load(self, lora: LoraFile, name: str | None = None, strength: float = 1.0) -> str:
        """Load ``lora`` at ``strength``; skips when the scheme or the model cannot take it."""
        try:
            return self.adapters.load(lora, name, strength)
        except LoraUnsupported as exc:
            self.refused[self.case.pipeline_key] = str(exc)  # the next tests skip without loading
            pytest.skip(str(exc))
        except LoraMismatch as exc:
            pytest.skip(str(exc))

    def set_strengths(self, strengths: dict[str, float]) -> None:
        """Activate exactly these adapters at these strengths."""
        self.adapters.set_strengths(strengths)

    def fuse(self) -> None:
        """``fuse_lora``; skips, quoting peft, when the scheme's layers cannot be fused into."""
        key = (*self.case.pipeline_key, "fuse")
        if key in self.refused:
            pytest.skip(self.refused[key])
        try:
            self.adapters.fuse()
        except LoraUnsupported as exc:  # a scheme's own LoRA mechanism saying why fusing does not apply
            self.refused[key] = str(exc)
            pytest.skip(self.refused[key])
        except _FUSE_REFUSALS as exc:
            self.refused[key] = (f"{self.case.scheme}: fuse_lora cannot fuse into its layers ({type(exc).__name__}: "
                                 f"{exc}); unfused LoRAs are gated by the other tests")
            pytest.skip(self.refused[key])

    def unfuse(self) -> None:
        self.adapters.unfuse()

    def unload(self) -> None:
        self.adapters.unload()

    @property
    def wrapped_layers(self) -> int:
        return self.adapters.wrapped_layers()


@pytest.fixture
def lora_adapters(runs_here: Case, quantgate_run: Any, request: pytest.FixtureRequest) -> Iterator[LoraKit]:
    """LoRA operations on the case's pipeline; everything is unloaded afterwards.

    Skips before the pipeline is loaded when the scheme declares it cannot take a LoRA or
    its layers already refused one in this session (list it before ``pipeline`` in a test).
    """
    refused = request.config.stash[_REFUSED]
    reason = lora_unsupported_reason(get_scheme(runs_here.scheme)) or refused.get(runs_here.pipeline_key)
    if reason:
        pytest.skip(reason)
    pipeline: LoadedPipeline = request.getfixturevalue("pipeline")
    kit = LoraKit(quantgate_run, runs_here, pipeline, refused)
    try:
        yield kit
    finally:
        try:
            kit.adapters.close()
        finally:
            if kit.adapters.altered:  # fused into, or a failed load: the plugin reloads it for the next test
                quantgate_run.altered.add(runs_here.pipeline_key)
            kit.release()


@pytest.fixture
def lora(lora_adapters: LoraKit, lora_source: Any, runs_here: Case, quantgate_run: Any) -> LoraFile:
    """The LoRA this test applies: the model's synthetic LoRA, or a user's (``--quantgate-lora``)."""
    if lora_source == SYNTHETIC:
        return lora_adapters.synthetic(0)
    entry: UserLora = lora_source
    if entry.model not in (None, runs_here.model):
        pytest.skip(f"--quantgate-lora {entry.model}={entry.source} is for {entry.model}, not {runs_here.model}")
    try:
        return resolve_user_lora(entry, hub_cache_dir(quantgate_run.ctx))
    except SourceUnavailable as exc:
        pytest.skip(str(exc))
    except SourceInvalid as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class LoraReference:
    """This session's bf16 eager outputs for one model, source, batch and LoRA.

    The bf16 eager case stores what it computed; other cases read it. ``get`` returns None
    when the bf16 case has not run (yet) in this session.
    """

    store: dict[tuple, Any]
    case: Case
    lora_id: str
    _keys: list[str] = field(default_factory=list)
    spread_note: str = ""  # under -n / --quantgate-shard: bf16 may have run in another process

    @property
    def is_baseline(self) -> bool:
        return is_baseline(self.case)

    def _key(self, label: str) -> tuple:
        c = self.case
        return (c.device, c.model, c.source, c.batch, c.height, c.width, self.lora_id, label)

    def offer(self, label: str, value: Any) -> None:
        """Keep ``value`` as the reference for ``label`` if this is the bf16 eager case."""
        if self.is_baseline:
            self.store[self._key(label)] = value

    def get(self, label: str) -> Any | None:
        """The bf16 eager value for ``label``, or None (this is bf16, or bf16 has not run)."""
        return None if self.is_baseline else self.store.get(self._key(label))

    def require(self, label: str) -> Any:
        """The bf16 eager value for ``label``; skips, saying why, when there is none."""
        if self.is_baseline:
            pytest.skip(f"{self.case.id} is the bf16 reference of this comparison")
        value = self.get(label)
        if value is None:
            pytest.skip(f"no bf16 eager result '{label}' for {self.case.model}/{self.case.source} with LoRA "
                        f"{self.lora_id} in this session (include bf16 in --quantgate-schemes; it runs first)"
                        + self.spread_note)
        return value


@pytest.fixture
def lora_reference(runs_here: Case, lora: LoraFile, request: pytest.FixtureRequest) -> LoraReference:
    """bf16 eager outputs with and without this test's LoRA (see ``LoraReference``)."""
    from quantgate.plugin.session import run_of

    return LoraReference(request.config.stash[_OUTPUTS], runs_here, str(lora.path),
                         spread_note=run_of(request.config).spread_note)
