"""Every option of the main plugin declared once (``_OPTIONS``) and read from the config: a
command-line value, else the ini key, else the plan's ``[options]``, else the default."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from quantgate import options
from quantgate.errors import ConfigFileError, OptionValueError, UnknownNameError
from quantgate.measure.timing import (
    RoundPolicy,
)
from quantgate.models import get_model, model_names
from quantgate.models.sources import AUTO
from quantgate.plans import Plan, matrix
from quantgate.quant.calibration import CalibrationSettings
from quantgate.schemes import get_scheme, scheme_names
from quantgate.settings import calibration_settings, parse_resolution
from quantgate.variants import VARIANTS, get_variant

T = TypeVar("T", int, float)

# -- options --------------------------------------------------------------------------------

_OPTIONS: dict[str, tuple[str, str | None]] = {
    # name: (help, default); each is also an ini key quantgate_<name>, and a plan may set it.
    "plan": ("a named selection of tests and cases from <rootdir>/fixtures/plans/ (or a .toml path); default: "
             "merge, unless --quantgate-models/-schemes/-variants/-batch select on their own", None),
    "models": ("comma-separated models (default: all registered)", None),
    "schemes": ("comma-separated schemes (default: all registered)", None),
    "variants": ("comma-separated variants (default: eager)", "eager"),
    "batch": ("comma-separated batch sizes (default: 1)", "1"),
    "source": ("weights source for the GPU tier: auto, hub, path, synthetic, tiny (default: auto)", AUTO),
    "cache-dir": ("quantgate's cache (synthetic weights...); default $QUANTGATE_CACHE_DIR or ~/.cache/quantgate", None),
    "gates": ("gates file or directory (default: <rootdir>/fixtures/gates)", None),
    "known-failures": ("cases known to fail on a given stack, skipped with their evidence "
                       "(default: <rootdir>/fixtures/known_failures.toml)", None),
    "prompts": ("prompt file (default: <rootdir>/fixtures/prompts/gate.txt)", None),
    "rounds": ("timed rounds per benchmark (default: 3)", "3"),
    "warmup": ("untimed warm-up rounds before them (default: 1)", "1"),
    "round-budget": ("seconds a GPU benchmark's timed rounds may take in all: past --quantgate-rounds it takes more "
                     "only within them, until the median's 95 percent confidence interval is within "
                     "--quantgate-ci-target (default: 3; 0: fixed rounds)",
                     "3"),
    "max-rounds": ("most timed rounds a GPU benchmark takes (default: 30)", "30"),
    "ci-target": ("relative half-width of the median's 95 percent confidence interval at which a GPU benchmark stops "
                  "(default: 0.01)", "0.01"),
    "cpu-rounds": ("timed rounds per benchmark on the CPU tier, where no timing is gated (default: --quantgate-rounds)",
                   None),
    "steps": ("override every model's number of inference steps", None),
    "resolution": ("override the resolution: N or HxW, multiples of 16", None),
    "seed": ("seed of synthetic weights and of generation (default: 0)", "0"),
    "golden-dir": ("golden image store (default: <rootdir>/golden_images)", None),
    "quality-prompts": ("how many gate prompts the quality tests generate, one image each (default: 4)", "4"),
    "artifacts": ("directory for side-by-side sample grids (default: none written)", None),
    "lpips-net": ("LPIPS backbone: alex, vgg or squeeze (default: alex); needs torchvision's pretrained "
                  "checkpoint in $TORCH_HOME/hub/checkpoints", "alex"),
    "clip-model": ("CLIP checkpoint for CLIP score: a directory or a hub repo id in the offline HF cache "
                   "(default: openai/clip-vit-large-patch14)", "openai/clip-vit-large-patch14"),
    "calibration-prompts": ("calibration prompt file for GPTQ/SVDQuant (default: "
                            "<rootdir>/fixtures/prompts/calibration.txt)", None),
    "calibration-samples": ("calibration samples (images generated) for GPTQ/SVDQuant "
                            "(default: 256 on a GPU, 16 on the CPU tier); sets both tiers", None),
    "gpu-calibration-samples": ("calibration samples on a GPU only (a plan's short calibration that leaves the "
                                "CPU tier's at 16); --quantgate-calibration-samples wins over it", None),
}


def add_options(parser: pytest.Parser) -> None:
    """Declare every --quantgate-* option of the main plugin (each also an ini key and a plan option)."""
    group = parser.getgroup("quantgate", "quantgate: quantized diffusion pipeline gates")
    for name, (help_text, _) in _OPTIONS.items():
        group.addoption(f"--quantgate-{name}", dest=f"quantgate_{name.replace('-', '_')}", default=None,
                        help=help_text)
        parser.addini(f"quantgate_{name.replace('-', '_')}", help_text, default=None)
    group.addoption("--quantgate-path", dest="quantgate_path", action="append", default=[], metavar="MODEL=DIR",
                    help="a diffusers directory for MODEL, used by --quantgate-source path (repeatable)")
    group.addoption("--quantgate-run-known-failures", dest="quantgate_run_known_failures", action="store_true",
                    help="run the cases --quantgate-known-failures lists for this stack instead of skipping them")
    group.addoption("--quantgate-update-golden", dest="quantgate_update_golden", action="store_true",
                    help="write the bf16 eager images of this run as the golden set (atomically) before comparing")


def _option(config: pytest.Config, name: str) -> str | None:
    return options.value(config, name, _OPTIONS[name][1])


def number(value: str | None, flag: str, cast: Callable[[str], T], kind: str, minimum: float) -> T | None:
    """``value`` of ``--quantgate-FLAG`` as ``cast`` gives it (None stays None); a usage error
    saying it must be ``kind``, or at least ``minimum``, otherwise. Every numeric option reads so."""
    if value is None:
        return None
    try:
        parsed = cast(value)
    except ValueError:
        raise pytest.UsageError(f"--quantgate-{flag} must be {kind}, got {value!r}") from None
    if not parsed >= minimum:  # NaN too
        raise pytest.UsageError(f"--quantgate-{flag} must be >= {minimum:g}, got {value}")
    return parsed


def _float(value: str | None, name: str, minimum: float) -> float:
    return number(value, name, float, "a number", minimum) or 0.0


def _round_policy(config: pytest.Config) -> RoundPolicy:
    """How many rounds a GPU benchmark takes: --quantgate-rounds, then more within the budget."""
    rounds = _int(_option(config, "rounds"), "rounds", 1) or 1
    most = _int(_option(config, "max-rounds"), "max-rounds", 1) or rounds
    return RoundPolicy(min_rounds=rounds, max_rounds=max(rounds, most),
                       ci_target=_float(_option(config, "ci-target"), "ci-target", 0.0),
                       budget_s=_float(_option(config, "round-budget"), "round-budget", 0.0))


def _calibration(config: pytest.Config) -> CalibrationSettings:
    """Calibration settings from the options; the prompt file is read when a scheme needs it."""
    given = _option(config, "calibration-prompts")
    path = Path(given or config.rootpath / "fixtures" / "prompts" / "calibration.txt")
    gpu, samples = _option(config, "gpu-calibration-samples"), _option(config, "calibration-samples")
    try:
        # Shared with the CLI (quantgate.settings). A count given on the command line or in the
        # ini file sets both tiers, over a plan's GPU count.
        return calibration_settings(
            path, seed=_int(_option(config, "seed"), "seed", 0) or 0,
            samples=None if samples is None else _int(samples, "calibration-samples", 1),
            gpu_samples=None if gpu is None else _int(gpu, "gpu-calibration-samples", 1),
            samples_given=options.given(config, "calibration-samples") is not None,
            required=bool(given))  # the default file may be absent where no scheme calibrates
    except ConfigFileError as exc:
        raise pytest.UsageError(str(exc)) from None


def _plan(config: pytest.Config) -> Plan:
    """The session's plan (``quantgate.plans``), narrowed or widened by the explicit selection options."""
    given = {name: options.given(config, name) for name in options.SELECTION_OPTIONS}
    models = _names(given["models"], model_names(), "model", get_model) if given["models"] is not None else None
    schemes = _names(given["schemes"], scheme_names(), "scheme", get_scheme) if given["schemes"] is not None else None
    variants = _names(given["variants"], list(VARIANTS), "variant", get_variant) \
        if given["variants"] is not None else None
    batches = None
    if given["batch"] is not None:
        batches = sorted({_int(b.strip(), "batch", 1) for b in given["batch"].split(",") if b.strip()})
        if not batches:
            raise pytest.UsageError("--quantgate-batch is empty")
    plan = options.session_plan(config)
    if plan is None:
        return matrix(models or model_names(), schemes or scheme_names(), variants or ["eager"], batches or [1])
    known = {name for name in vars(config.option) if name.startswith("quantgate_")}
    unknown = sorted(k for k in plan.options if options.dest(k) not in known)
    if unknown:
        raise pytest.UsageError(f"{plan.path}: [options] names {unknown[0]!r}, which is no --quantgate option")
    return plan.narrowed(models, schemes, variants, batches)


def _names(value: str | None, valid: Sequence[str], kind: str, lookup: Callable[[str], Any]) -> list[str]:
    if value is None:
        return list(valid)
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise pytest.UsageError(f"--quantgate-{kind}s is empty; valid {kind}s: {', '.join(valid)}")
    for name in names:
        try:
            lookup(name)
        except UnknownNameError as exc:
            raise pytest.UsageError(str(exc)) from None
    return names


def _int(value: str | None, flag: str, minimum: int) -> int | None:
    return number(value, flag, int, "an integer", minimum)


def _resolution(value: str | None) -> tuple[int, int] | None:
    try:
        return parse_resolution(value)  # shared with the CLI (quantgate.settings)
    except OptionValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def _paths(values: list[str]) -> dict[str, Path]:
    paths = {}
    for value in values:
        model, sep, directory = value.partition("=")
        if not sep or not directory:
            raise pytest.UsageError(f"--quantgate-path takes MODEL=DIR, got {value!r}")
        try:
            get_model(model)
        except UnknownNameError as exc:
            raise pytest.UsageError(f"--quantgate-path {value}: {exc}") from None
        paths[model] = Path(directory).expanduser()
    return paths


def _display_path(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (clickable in messages)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
