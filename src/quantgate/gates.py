"""Gates: every threshold the suite enforces, read from ``fixtures/gates/`` (one file per backend).

A gate is a ``[[gate]]`` table: the ``metric`` it bounds, optional selectors (``model``,
``family``, ``source``, ``scheme``, ``variant``, ``batch``, ``hardware``, ``budget``; each a value
or a list of values), ``min`` and/or ``max``, and ``why``: where the number comes from. A case
uses the most specific gate whose selectors all match it (per-hardware overrides are simply
more specific gates); two matching gates of equal specificity are an error, never a coin flip.
A failure message shows measured vs required, the gate's file and line, and its ``why``.

A gates path is one TOML file or a directory of them (every ``*.toml`` in it, in sorted order,
read as one book): ``fixtures/gates/<backend>.toml`` for each scheme backend, ``harness.toml``
for the gates of no one scheme and ``shared.toml`` for gates naming schemes of several backends.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError, UnknownNameError
from quantgate.tomlfiles import read_toml, table_lines


@dataclass(frozen=True)
class Metric:
    """A quantity gates can bound, with its unit for messages."""

    unit: str  # "x" (ratio), "bytes", "s", "fraction", "dB", "count"
    description: str
    better: str = "higher"  # which direction is an improvement, for comparisons across runs
    lowest: float | None = 0.0  # the smallest value the metric can take (None: unbounded below)

    def __post_init__(self) -> None:
        if self.unit == "dB" and self.lowest == 0.0:
            object.__setattr__(self, "lowest", None)  # a decibel ratio can be negative


METRICS: dict[str, Metric] = {
    "transformer_footprint_reduction": Metric(
        "x", "bytes of the denoiser in bf16 divided by its bytes as the scheme loads it"),
    "transformer_speedup_vs_bf16": Metric(
        "x", "median of one bf16 eager transformer forward over this case's median, same batch and shapes"),
    "transformer_speedup_vs_nf4": Metric(
        "x", "median of one bnb-nf4 eager transformer forward over this case's median, same batch and shapes"),
    "end_to_end_speedup_vs_bf16": Metric(
        "x", "median of the bf16 eager prompt-to-image call over this case's median, same batch"),
    "end_to_end_speedup_vs_nf4": Metric(
        "x", "median of the bnb-nf4 eager prompt-to-image call over this case's median, same batch"),
    "end_to_end_peak_allocated_bytes": Metric(
        "bytes", "peak bytes allocated by torch on the GPU during the timed prompt-to-image rounds", better="lower"),
    "timing_disagreement_vs_cuda_events": Metric(
        "fraction", "|suite median - CUDA-event median| / CUDA-event median, the events timing a separate loop after "
                    "the suite's rounds (the method of runs before 2026-12; kept to read them)", better="lower"),
    "timing_disagreement_same_rounds": Metric(
        "fraction", "|suite median - CUDA-event median| / CUDA-event median, both clocks timing the same rounds "
                    "of a transformer forward on a path the GPU bounds (the method since runs of 2026-12)", better="lower"),
    "timing_disagreement_same_rounds_launch_bound": Metric(
        "fraction", "the same on a path bound by kernel launches (GPU busy < 80% of the wall time)", better="lower"),
    "timing_disagreement_same_rounds_unclassified": Metric(
        "fraction", "the same where the GPU's busy share could not be profiled", better="lower"),
    "gpu_busy_fraction": Metric(
        "fraction", "seconds the GPU ran kernels and copies during one transformer forward over its wall time "
                    "(torch profiler); below 0.8 the path is bound by the host launching kernels"),
    "dynamo_compiles_in_timed_rounds": Metric(
        "count", "graphs torch.compile built during the timed rounds (after the first call and the warm-up)",
        better="lower"),
    "image_psnr_db_vs_reference": Metric(
        "dB", "PSNR of the images against the reference (golden set, else bf16 eager of this session)"),
    "image_ssim_vs_reference": Metric(
        "fraction", "mean SSIM of the images against the same reference"),
    "transformer_output_relative_error_vs_bf16": Metric(
        "fraction", "||out - bf16 out|| / ||bf16 out|| of one transformer forward on fixed seeded inputs", better="lower"),
    "image_lpips_vs_reference": Metric(
        "fraction", "mean LPIPS distance of the images to the reference (pretrained backbone only)", better="lower"),
    "clip_score_cosine": Metric(
        "fraction", "mean cosine of CLIP image and prompt embeddings (pretrained CLIP only)", lowest=-1.0),
    "clip_score_ratio_vs_reference": Metric(
        "fraction", "the images' mean CLIP cosine divided by the reference images' on the same prompts"),
    "transformer_output_error_ratio_vs_rtn": Metric(
        "x", "transformer-output relative error vs bf16 of a GPTQ scheme over that of its round-to-nearest "
             "baseline on the same grid (below 1: GPTQ's gain)", better="lower"),
    "leaked_gpu_bytes": Metric(
        "bytes", "GPU bytes still allocated after a pipeline is released, above the session's baseline", better="lower"),
    # SVDQuant
    "low_rank_branch_timing_overhead": Metric(
        "fraction", "transformer forward median with the low-rank branch over the median without it, minus 1",
        better="lower", lowest=-1.0),
    # -- LoRA (tests/test_lora.py); "out" is one transformer forward on fixed seeded inputs ----------
    "lora_effect_relative_change": Metric(
        "fraction", "||out with the LoRA at strength 1 - out without|| / ||out without||, same pipeline"),
    "lora_effect_over_quantization_noise": Metric(
        "x", "the LoRA's effect (above) over the scheme's own noise ||out - bf16 out|| / ||bf16 out||, no LoRA"),
    "lora_effect_cosine_vs_bf16": Metric(
        "fraction", "cosine between this case's LoRA effect (out with - out without) and bf16 eager's on the same "
                    "inputs: the LoRA moves the quantized model in the direction it moves bf16", lowest=-1.0),
    "lora_effect_size_ratio_vs_bf16": Metric(
        "x", "||this case's LoRA effect|| / ||bf16 eager's LoRA effect||: the LoRA moves it as far as bf16"),
    "lora_image_psnr_db_vs_no_lora": Metric(
        "dB", "PSNR of bf16 eager's image with the LoRA against its image without (same prompt and seed)"),
    "lora_output_relative_error_vs_bf16": Metric(
        "fraction", "||out with the LoRA - bf16 out with the same LoRA|| / ||bf16 out with it||", better="lower"),
    "lora_error_growth_vs_no_lora": Metric(
        "x", "relative error vs bf16 with the same LoRA over the relative error vs bf16 without a LoRA",
        better="lower"),
    "lora_image_psnr_db_vs_bf16": Metric(
        "dB", "PSNR of the images generated with the LoRA against bf16 eager's images with the same LoRA"),
    "lora_zero_strength_relative_change": Metric(
        "fraction", "||out with the LoRA at strength 0 - out without a LoRA|| / ||out without||", better="lower"),
    "lora_effect_growth_per_doubling": Metric(
        "x", "the smaller of effect(1)/effect(0.5) and effect(2)/effect(1); a linear response gives 2"),
    "lora_unload_relative_change": Metric(
        "fraction", "||out after unload_lora_weights - out before the LoRA was loaded|| / ||out before||",
        better="lower"),
    "lora_composition_relative_error": Metric(
        "fraction", "||out with LoRAs a (1.0) and b (0.5) as two adapters - out with one adapter of their concatenated "
                    "ranks|| / ||that out - out without a LoRA||", better="lower"),
    "lora_fused_relative_error_vs_unfused": Metric(
        "fraction", "||out after fuse_lora - out with the same LoRA unfused|| / ||out unfused||", better="lower"),
    "lora_fuse_round_trip_relative_change": Metric(
        "fraction", "||out after fuse_lora, unfuse_lora, unload_lora_weights - out before|| / ||out before||",
        better="lower"),
    "lora_forward_overhead": Metric(
        "x", "median transformer forward with the LoRA loaded (unfused) over the median without, same case",
        better="lower"),
    # -- GPU memory budgets (--quantgate-gpu-budget; tests/test_budget.py) ----------------------------
    "gpu_budget_fraction_used": Metric(
        "fraction", "(peak bytes reserved by torch over the case, loading included, + bytes held outside torch) "
                    "/ the --quantgate-gpu-budget; above 1 the case does not fit the smaller card", better="lower"),
    "end_to_end_speedup_vs_bf16_offload": Metric(
        "x", "median prompt-to-image call of bf16 with the fastest CPU-offload variant that fits the budget "
             "over this case's median, same batch"),
}

SELECTORS: dict[str, type] = {"model": str, "family": str, "source": str, "scheme": str, "variant": str,
                              "batch": int, "hardware": str,
                              "budget": str}  # budget: --quantgate-gpu-budget as "16GiB"
# family: the model registry's family of the case's model ("flux", "sd3"), for gates its models share.
_GATE_KEYS = {"metric", "min", "max", "why", *SELECTORS}


def format_value(value: float, unit: str) -> str:
    """A measured or required value as a person reads it."""
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "bytes":
        return f"{value / 2**30:.3f} GiB ({int(value)} bytes)" if abs(value) >= 2**20 else f"{int(value)} bytes"
    if unit == "s":
        return f"{value:.4f} s"
    if unit == "dB":
        return f"{value:.2f} dB"
    if unit == "count":
        return f"{int(value)}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Gate:
    """One ``[[gate]]`` entry."""

    metric: str
    selectors: Mapping[str, tuple[Any, ...]]
    min: float | None
    max: float | None
    why: str
    path: Path
    line: int

    @property
    def specificity(self) -> int:
        return len(self.selectors)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        return all(attrs.get(key) in values for key, values in self.selectors.items())

    def requirement(self) -> str:
        unit = METRICS[self.metric].unit
        parts = []
        if self.min is not None:
            parts.append(f">= {format_value(self.min, unit)}")
        if self.max is not None:
            parts.append(f"<= {format_value(self.max, unit)}")
        return " and ".join(parts)

    def check(self, value: float, subject: str = "", ci95: tuple[float, float] | None = None) -> Verdict:
        """Compare ``value`` with this gate; NaN never passes.

        With ``ci95`` (a 95% interval around ``value``) a ``min`` is checked against the
        interval's lower end and a ``max`` against its upper end: the gate passes only when
        the whole interval does.
        """
        low, high = (value, value) if ci95 is None else ci95
        ok = not math.isnan(value)
        if ok and self.min is not None:
            ok = low >= self.min
        if ok and self.max is not None:
            ok = high <= self.max
        unit = METRICS[self.metric].unit
        interval = ""
        if ci95 is not None:
            side = "lower" if self.min is not None else "upper"
            interval = (f" (95% interval {format_value(low, unit)} to {format_value(high, unit)}, "
                        f"gated on its {side} end)")
        message = (f"{self.metric}{' of ' + subject if subject else ''}: measured {format_value(value, unit)}"
                   f"{interval}, required {self.requirement()} [{self.where}: {self.why}]")
        return Verdict(gate=self, value=value, passed=ok, message=message, ci95=ci95)


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one measured value against one gate."""

    gate: Gate
    value: float
    passed: bool
    message: str
    ci95: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.gate.metric,
            "value": self.value,
            "min": self.gate.min,
            "max": self.gate.max,
            "passed": self.passed,
            "gate": self.gate.where,
            "why": self.gate.why,
            "ci95": None if self.ci95 is None else [self.ci95[0], self.ci95[1]],
        }


@dataclass
class GateBook:
    """All gates of one file or one directory of files, with lookup by metric and case attributes."""

    path: Path
    gates: list[Gate] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the files read, in order (``path`` itself for a file)

    @classmethod
    def load(cls, path: str | Path, vocabulary: Mapping[str, Collection[Any]] | None = None,
             option: str = "--quantgate-gates") -> GateBook:
        """Read and validate ``path``, a gates file or a directory of them (every ``*.toml`` in it, in
        sorted order); ``vocabulary`` lists the valid value of each selector; ``option`` is the flag
        that names another path (the plugin's, or a CLI command's ``--gates``).

        Raises ConfigFileError naming the file, line and key of the first problem; a gate that
        duplicates another (same metric and selectors), in the same file or another, is one.
        """
        path = Path(path)
        book = cls(path=path, files=gate_files(path, option))
        for file in book.files:
            book.gates.extend(_load_file(file, vocabulary or {}, option))
        book._check_duplicates()
        return book

    def _check_duplicates(self) -> None:
        seen: dict[tuple, Gate] = {}
        for gate in self.gates:
            key = (gate.metric, tuple(sorted((k, tuple(sorted(map(str, v)))) for k, v in gate.selectors.items())))
            if key in seen:
                first = seen[key]
                where = f"line {first.line}" if first.path == gate.path else first.where
                raise ConfigFileError(gate.path, f"duplicates the gate at {where} (same metric and selectors)",
                                      line=gate.line, key=gate.metric)
            seen[key] = gate

    def lookup(self, metric: str, attrs: Mapping[str, Any]) -> Gate | None:
        """The most specific gate for ``metric`` matching ``attrs``, or None if there is none.

        Attributes without a ``family`` (the records of runs before the selector) take the
        family of their ``model`` from the model registry.
        """
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        attrs = with_family(attrs)
        candidates = [g for g in self.gates if g.metric == metric and g.matches(attrs)]
        if not candidates:
            return None
        best = max(g.specificity for g in candidates)
        top = [g for g in candidates if g.specificity == best]
        if len(top) > 1:
            one_file = len({g.path for g in top}) == 1
            lines = ", ".join(str(g.line) if one_file else g.where for g in top)
            raise ConfigFileError(top[0].path, f"gates at lines {lines} match the same case equally well "
                                  f"({dict(attrs)}); make one more specific", line=top[0].line, key=metric)
        return top[0]


def gate_files(path: Path, option: str = "--quantgate-gates") -> list[Path]:
    """The files a gates path stands for: the file itself, or a directory's ``*.toml`` sorted by name."""
    if not path.is_dir():
        return [path]  # read_toml says what is wrong with a missing or unreadable one
    files = sorted(p for p in path.glob("*.toml") if p.is_file())
    if not files:
        raise ConfigFileError(path, f"gates directory holds no *.toml file (pass {option} FILE or DIRECTORY)")
    return files


def gates_digest(path: str | Path) -> str:
    """The sha256 a run records for its gates (``gates_sha256``): of the file's bytes, or, for a
    directory, over its ``*.toml`` files sorted by name, each as its name relative to the
    directory, a NUL, its length in bytes, a NUL and its bytes. A missing path digests as empty."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.glob("*.toml") if p.is_file()):
            data = file.read_bytes()
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0")
            digest.update(data)
    return digest.hexdigest()


def with_family(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``attrs`` with the ``family`` of its ``model`` added where it has none (and the model is known)."""
    if "family" in attrs or not isinstance(attrs.get("model"), str):
        return attrs
    family = _family_of(attrs["model"])
    return attrs if family is None else {**attrs, "family": family}


@functools.cache
def _family_of(model: str) -> str | None:
    from quantgate.models import get_model

    try:
        return get_model(model).family
    except UnknownNameError:
        return None


def _load_file(path: Path, vocabulary: Mapping[str, Collection[Any]], option: str) -> list[Gate]:
    data, text = read_toml(path, "gates file", f"gates file not found (pass {option} FILE or DIRECTORY)")
    unknown = set(data) - {"gate"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigFileError(path, f"unknown top-level key {key!r}; gates are [[gate]] tables",
                              line=_line_of(text, rf"^\s*\[?\[?\s*{re.escape(key)}\b"), key=key)
    raw_gates = data.get("gate", [])
    if not isinstance(raw_gates, list):
        raise ConfigFileError(path, "'gate' must be an array of tables ([[gate]])", key="gate")
    lines = table_lines(text, "gate")
    return [_parse_gate(raw, path, lines[index] if index < len(lines) else None, vocabulary)
            for index, raw in enumerate(raw_gates)]


def _line_of(text: str, pattern: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.search(pattern, line):
            return number
    return None


def _parse_gate(raw: Any, path: Path, line: int | None, vocabulary: Mapping[str, Collection[Any]]) -> Gate:
    if not isinstance(raw, dict):
        raise ConfigFileError(path, "each [[gate]] must be a table", line=line)
    unknown = set(raw) - _GATE_KEYS
    if unknown:
        raise ConfigFileError(path, f"unknown key {sorted(unknown)[0]!r} (valid: {', '.join(sorted(_GATE_KEYS))})",
                              line=line, key=sorted(unknown)[0])
    metric = raw.get("metric")
    if metric not in METRICS:
        raise ConfigFileError(path, f"unknown metric {metric!r} (known: {', '.join(sorted(METRICS))})",
                              line=line, key="metric")
    bounds = {}
    for key in ("min", "max"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigFileError(path, f"{key} must be a number, got {value!r}", line=line, key=key)
        bounds[key] = None if value is None else float(value)
        if bounds[key] is not None and not math.isfinite(bounds[key]):
            raise ConfigFileError(path, f"{key} must be a finite number, got {value!r}: NaN fails every value and "
                                  "an infinite bound none", line=line, key=key)
    lowest = METRICS[metric].lowest
    if lowest is not None and bounds["min"] is not None and bounds["min"] <= lowest:
        raise ConfigFileError(path, f"min {bounds['min']:g} can never fail: {metric} is never below {lowest:g}",
                              line=line, key="min")
    if lowest is not None and bounds["max"] is not None and bounds["max"] < lowest:
        raise ConfigFileError(path, f"max {bounds['max']:g} can never pass: {metric} is never below {lowest:g}",
                              line=line, key="max")
    if bounds["min"] is None and bounds["max"] is None:
        raise ConfigFileError(path, "a gate needs min, max or both", line=line, key=metric)
    if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
        raise ConfigFileError(path, f"min {bounds['min']} is above max {bounds['max']}: no value can pass",
                              line=line, key="min")
    why = raw.get("why")
    if not isinstance(why, str) or not why.strip():
        raise ConfigFileError(path, "every gate says where its number comes from: add why = \"...\"",
                              line=line, key="why")
    selectors: dict[str, tuple[Any, ...]] = {}
    for key, kind in SELECTORS.items():
        if key not in raw:
            continue
        values = raw[key] if isinstance(raw[key], list) else [raw[key]]
        if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise ConfigFileError(path, f"{key} must be a {kind.__name__} or a list of them, got {raw[key]!r}",
                                  line=line, key=key)
        valid = vocabulary.get(key)
        if valid is not None:
            bad = [v for v in values if v not in valid]
            if bad:
                raise ConfigFileError(path, f"unknown {key} {bad[0]!r} (valid: {', '.join(map(str, sorted(valid)))})",
                                      line=line, key=key)
        selectors[key] = tuple(values)
    return Gate(metric=metric, selectors=selectors, min=bounds["min"], max=bounds["max"], why=why.strip(),
                path=path, line=line or 0)
