"""Plans: named selections of (test, case) pairs, kept as data in ``fixtures/plans/<name>.toml``.

A plan is what a run checks. ``merge`` is the default of ``pytest -m gpu`` (every claim once,
about ten minutes on one H100/H200 with warm caches); ``nightly`` is the full matrix. A plan
file holds::

    description = "..."
    leaves = ["what this plan does not check, and which plan does"]
    harness_left_out = ["test_a_real_cuda_oom_*"]  # harness tests (quantgate's own, no case) not run

    [options]                     # session defaults; a command-line option or ini value wins
    rounds = 3

    [[select]]                    # cases: models x schemes x variants x batches, for these tests
    why = "the claim these pairs check"
    models = ["flux-schnell"]     # or "*": every registered one
    schemes = ["bf16", "fp8-row"]
    variants = ["eager"]          # default ["eager"]
    batches = [1]                 # default [1]
    tests = ["test_transformer_*"]  # fnmatch patterns over test function names; default ["*"]
    tiers = ["gpu"]               # default ["gpu", "cpu"] (the CPU tier runs the tiny models)

A (test, case) pair is generated when any entry selects it. ``--quantgate-models``,
``--quantgate-schemes``, ``--quantgate-variants`` and ``--quantgate-batch`` replace that
dimension in every entry (narrowing or widening the plan); without ``--quantgate-plan`` they
select exactly what they name, for every test (the ``matrix`` of the options alone).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError, UnknownNameError
from quantgate.tomlfiles import read_toml, table_lines

DEFAULT_PLAN = "merge"
ALL = "*"
_PLAN_KEYS = {"description", "leaves", "options", "select", "harness_left_out"}
_ENTRY_KEYS = {"why", "models", "schemes", "variants", "batches", "tests", "tiers"}
TIER_NAMES = ("gpu", "cpu")


@dataclass(frozen=True)
class Entry:
    """One ``[[select]]``: a matrix of cases and the tests that run on them."""

    models: tuple[str, ...]
    schemes: tuple[str, ...]
    variants: tuple[str, ...] = ("eager",)
    batches: tuple[int, ...] = (1,)
    tests: tuple[str, ...] = (ALL,)
    tiers: tuple[str, ...] = TIER_NAMES
    why: str = ""
    line: int | None = None

    def selects_test(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.tests)


@dataclass(frozen=True)
class Plan:
    """A named selection and the session defaults it runs with."""

    name: str
    entries: tuple[Entry, ...]
    description: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    leaves: tuple[str, ...] = ()
    path: Path | None = None
    # fnmatch patterns of harness tests (no case: quantgate's own GPU checks) the plan does not run
    harness_left_out: tuple[str, ...] = ()

    def leaves_out_harness_test(self, name: str) -> bool:
        """Whether the harness test ``name`` (a function name) is one this plan leaves out."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.harness_left_out)

    def narrowed(self, models: Sequence[str] | None = None, schemes: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None, batches: Sequence[int] | None = None) -> Plan:
        """This plan with each given dimension replaced in every entry (the explicit options)."""
        given = {k: tuple(v) for k, v in (("models", models), ("schemes", schemes), ("variants", variants),
                                          ("batches", batches)) if v is not None}
        if not given:
            return self
        return replace(self, entries=tuple(replace(e, **given) for e in self.entries))

    def _union(self, attr: str) -> list[Any]:
        return list(dict.fromkeys(v for e in self.entries for v in getattr(e, attr)))

    def models(self) -> list[str]:
        """Every model some entry names, in order."""
        return self._union("models")

    def schemes(self) -> list[str]:
        return self._union("schemes")

    def variants(self) -> list[str]:
        return self._union("variants")

    def batches(self) -> list[int]:
        return sorted(self._union("batches"))

    def entries_for(self, test: str, tier: str) -> list[Entry]:
        """The entries that select ``test`` in ``tier``."""
        return [e for e in self.entries if tier in e.tiers and e.selects_test(test)]

    def as_dict(self) -> dict[str, Any]:
        """What the JSON records of the plan a run used."""
        return {"name": self.name, "path": str(self.path) if self.path else None, "description": self.description,
                "options": dict(self.options), "leaves": list(self.leaves),
                "harness_left_out": list(self.harness_left_out),
                "select": [{"why": e.why, "models": list(e.models), "schemes": list(e.schemes),
                            "variants": list(e.variants), "batches": list(e.batches), "tests": list(e.tests),
                            "tiers": list(e.tiers)} for e in self.entries]}


def matrix(models: Sequence[str], schemes: Sequence[str], variants: Sequence[str], batches: Sequence[int]) -> Plan:
    """The plan of explicit options alone: exactly these cases, every test."""
    return Plan("matrix", (Entry(tuple(models), tuple(schemes), tuple(variants), tuple(batches)),),
                description="the cases --quantgate-models/-schemes/-variants/-batch name, every test")


def plan_dirs(rootdir: Path) -> list[Path]:
    """Where plans are looked up by name: the repository's ``fixtures/plans``."""
    return [rootdir / "fixtures" / "plans"]


def plan_names(dirs: Iterable[Path]) -> list[str]:
    """Every plan name found in ``dirs``."""
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})


def find_plan(name: str, dirs: Sequence[Path]) -> Path:
    """The file of plan ``name`` (a name in ``dirs``, or a path to a .toml file)."""
    if name.endswith(".toml"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigFileError(path, "no such plan file")
        return path
    for directory in dirs:
        path = directory / f"{name}.toml"
        if path.is_file():
            return path
    raise UnknownNameError("plan", name, plan_names(dirs))


def _names(value: Any, what: str, valid: Sequence[str], path: Path, line: int | None) -> tuple[str, ...]:
    if value == ALL:
        return tuple(valid)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigFileError(path, f"{what} must be \"*\" or a non-empty list of names, got {value!r}", line=line)
    for name in value:
        if name not in valid:
            raise ConfigFileError(path, str(UnknownNameError(what.rstrip("s"), name, valid)), line=line)
    return tuple(value)


def load_plan(path: Path, vocabulary: Mapping[str, Sequence[str]]) -> Plan:
    """Read and validate the plan at ``path``; ``vocabulary`` holds the valid models, schemes and
    variants. Every mistake is a ConfigFileError naming the file, line and key."""
    data, text = read_toml(path, "plan", "no such plan file")
    unknown = set(data) - _PLAN_KEYS
    if unknown:
        raise ConfigFileError(path, f"unknown key {sorted(unknown)[0]!r} (valid: {', '.join(sorted(_PLAN_KEYS))})")
    lines = table_lines(text, "select")
    raw = data.get("select", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigFileError(path, "a plan needs at least one [[select]] entry")
    entries = []
    for index, item in enumerate(raw):
        line = lines[index] if index < len(lines) else None
        bad = set(item) - _ENTRY_KEYS
        if bad:
            raise ConfigFileError(path, f"unknown key {sorted(bad)[0]!r} (valid: {', '.join(sorted(_ENTRY_KEYS))})",
                                  line=line)
        for key in ("models", "schemes"):
            if key not in item:
                raise ConfigFileError(path, f"[[select]] needs {key} (a list of names, or \"*\")", line=line)
        batches = item.get("batches", [1])
        if not isinstance(batches, list) or not batches or not all(isinstance(b, int) and b >= 1 for b in batches):
            raise ConfigFileError(path, f"batches must be a list of integers >= 1, got {batches!r}", line=line)
        tests = item.get("tests", [ALL])
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ConfigFileError(path, f"tests must be a list of test-name patterns, got {tests!r}", line=line)
        entries.append(Entry(
            models=_names(item["models"], "models", vocabulary["model"], path, line),
            schemes=_names(item["schemes"], "schemes", vocabulary["scheme"], path, line),
            variants=_names(item.get("variants", ["eager"]), "variants", vocabulary["variant"], path, line),
            batches=tuple(sorted(set(batches))),
            tests=tuple(tests),
            tiers=_names(item.get("tiers", list(TIER_NAMES)), "tiers", TIER_NAMES, path, line),
            why=str(item.get("why", "")), line=line))
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise ConfigFileError(path, "[options] must be a table of option = value")
    leaves = data.get("leaves", [])
    if not isinstance(leaves, list) or not all(isinstance(x, str) for x in leaves):
        raise ConfigFileError(path, "leaves must be a list of sentences")
    harness = data.get("harness_left_out", [])
    if not isinstance(harness, list) or not all(isinstance(x, str) for x in harness):
        raise ConfigFileError(path, f"harness_left_out must be a list of test-name patterns, got {harness!r}")
    return Plan(path.stem, tuple(entries), str(data.get("description", "")),
                {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()},
                tuple(leaves), path, tuple(harness))
