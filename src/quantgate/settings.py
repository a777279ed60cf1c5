"""Settings the pytest plugin and the ``quantgate`` command build the same way, in one place.

Neither side imports the other for these: both take the cache directory, the device, the
resolution, the calibration settings and a golden set's settings from here, so that what
``quantgate gptq`` or ``quantgate golden`` writes is what a pytest run with the equivalent
``--quantgate-*`` options looks for (same cache keys, same golden settings).

Importing this module costs the standard library only; torch, the prompt files and the
quantizers load when a function needs them. A bad value raises
:class:`~quantgate.errors.OptionValueError` (a ``QuantgateError`` and a ``ValueError``) or
:class:`~quantgate.errors.ConfigFileError`, worded with the option as the caller spells it:
the plugin wraps them in ``pytest.UsageError``, the command prints them and exits 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import OptionValueError

if TYPE_CHECKING:
    from quantgate.cases import Case
    from quantgate.quant.calibration import CalibrationSettings

CACHE_DIR_ENV = "QUANTGATE_CACHE_DIR"
CACHE_DIR_HELP = "default: $QUANTGATE_CACHE_DIR, else $XDG_CACHE_HOME/quantgate, else ~/.cache/quantgate"
RESOLUTION_HELP = "N or HxW, multiples of 16"


def default_cache_dir() -> Path:
    """``$QUANTGATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantgate``, else ``~/.cache/quantgate``.

    An empty variable counts as unset.
    """
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quantgate"


def cache_dir(given: str | os.PathLike[str] | None) -> Path:
    """The cache directory an option names (``~`` expanded), else :func:`default_cache_dir`."""
    return Path(given or default_cache_dir()).expanduser()


def default_device(given: str | None = None) -> str:
    """``given`` when set, else ``"cuda"`` where torch sees a CUDA device, else ``"cpu"``."""
    if given:
        return given
    from quantgate.hardware import cuda_available

    return "cuda" if cuda_available() else "cpu"


def parse_resolution(value: str | None, option: str = "--quantgate-resolution") -> tuple[int, int] | None:
    """``(height, width)`` from ``"N"`` (square) or ``"HxW"``; ``None`` for ``None`` (the model card's).

    Both sides must be positive multiples of 16 (the VAE and patching of every registered
    model); anything else raises :class:`OptionValueError` naming ``option``.
    """
    if value is None:
        return None
    try:
        dims = [int(part) for part in value.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims *= 2
    if len(dims) != 2 or any(d <= 0 or d % 16 for d in dims):
        raise OptionValueError(f"{option} must be N or HxW with multiples of 16, got {value!r}")
    return dims[0], dims[1]


def calibration_counts(samples: int | None, gpu_samples: int | None = None, *,
                       samples_given: bool = True) -> dict[str, int]:
    """The sample counts of :class:`~quantgate.quant.calibration.CalibrationSettings` to override.

    ``samples`` (``--quantgate-calibration-samples``, the CLI's ``--samples``) sets both tiers;
    ``gpu_samples`` (``--quantgate-gpu-calibration-samples``, a plan's short GPU calibration)
    sets the GPU's only. When both are set, ``samples`` wins on the GPU only if it was
    ``samples_given`` by the user (command line or ini) rather than by the plan; otherwise it
    sets the CPU tier's count alone. Unset counts keep the defaults (256 on a GPU, 16 on the CPU).
    """
    counts: dict[str, int] = {}
    if gpu_samples is not None:
        counts["samples"] = gpu_samples
    if samples is not None and (samples_given or gpu_samples is None):
        counts.update(samples=samples, cpu_samples=samples)
    elif samples is not None:
        counts["cpu_samples"] = samples
    return counts


def calibration_settings(prompts_file: str | os.PathLike[str], *, seed: int = 0, samples: int | None = None,
                         gpu_samples: int | None = None, samples_given: bool = True,
                         required: bool = True) -> CalibrationSettings:
    """Calibration settings for GPTQ/SVDQuant-style schemes, as the plugin and the CLI build them.

    The prompts are read from ``prompts_file`` when ``required`` or when the file exists (a
    default file may be absent where no scheme calibrates: then the settings hold no prompts,
    and calibrating says so). A missing or empty file that is required raises
    :class:`~quantgate.errors.ConfigFileError`. The counts are :func:`calibration_counts`'s.
    """
    from quantgate.prompts import PromptSet
    from quantgate.quant.calibration import CalibrationSettings

    path = Path(prompts_file)
    prompts: tuple[str, ...] = ()
    if required or path.is_file():
        prompts = PromptSet.load(path).prompts
    counts = calibration_counts(samples, gpu_samples, samples_given=samples_given)
    return CalibrationSettings(prompts, seed=seed, prompts_file=str(path), **counts)


def golden_settings(case: Case, weights: str) -> dict[str, Any]:
    """What a golden image set is keyed on: bf16, the case's call arguments and the weights' identity.

    ``weights`` is the resolved source's ``detail``: a golden set made from other weights is
    stale, not a reference. Golden sets are always generated by the bf16 eager pipeline, so
    the scheme is ``"bf16"`` whatever scheme the comparing case has.
    """
    return {"scheme": "bf16", **case.call_kwargs(), "weights": weights}
