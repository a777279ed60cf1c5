"""Cases known to fail on a given software stack, skipped with the evidence unless asked to run.

``fixtures/known_failures.toml`` lists what a device run showed cannot work, or cannot finish,
on specific library versions. Each entry gives the scheme, the variant, the device and
optionally the models, plus the version specifiers of the stack it was seen on. A matching case
is skipped with the reason and the report that measured it, and ``--quantgate-run-known-failures`` runs it anyway. An entry
matches only the versions it names, so a newer torch or torchao runs the case again and shows
whether the failure is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from quantgate.cases import selector_vocabulary
from quantgate.errors import ConfigFileError
from quantgate.hardware import library_version
from quantgate.tomlfiles import read_toml, table_lines

_KEYS = {"scheme", "variant", "device", "model", "versions", "reason", "evidence"}
_REQUIRED = ("scheme", "variant", "device", "versions", "reason", "evidence")


@dataclass(frozen=True)
class KnownFailure:
    """One entry: which cases, on which versions, fail how, and where that was measured."""

    schemes: frozenset[str]
    variant: str
    device: str
    versions: Mapping[str, SpecifierSet]
    reason: str
    evidence: str
    where: str = ""  # file:line
    models: frozenset[str] | None = None  # None: every model

    def matches(self, scheme: str, variant: str, device: str, model: str,
                installed: Callable[[str], str | None] = library_version) -> bool:
        """Whether a case of ``model``/``scheme``/``variant`` on ``device`` runs on the stack this names."""
        if scheme not in self.schemes or variant != self.variant or device.split(":")[0] != self.device:
            return False
        if self.models is not None and model not in self.models:
            return False
        for dist, spec in self.versions.items():
            version = installed(dist)
            try:
                if version is None or not spec.contains(Version(version), prereleases=True):
                    return False
            except InvalidVersion:
                return False
        return True

    def stack(self) -> str:
        return ", ".join(f"{dist}{spec}" for dist, spec in self.versions.items())


@dataclass
class KnownFailures:
    """Every entry of one file."""

    path: Path
    entries: list[KnownFailure] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> KnownFailures:
        """Read and validate ``path`` (a missing file is an empty list); errors name file, line and key."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        data, text = read_toml(path, "known failures file", "not found")
        if set(data) - {"known"}:
            raise ConfigFileError(path, "known failures are [[known]] tables", key=sorted(set(data) - {"known"})[0])
        lines = table_lines(text, "known")
        book = cls(path)
        for index, raw in enumerate(data.get("known", [])):
            book.entries.append(_parse(raw, path, lines[index] if index < len(lines) else None))
        return book

    def find(self, scheme: str, variant: str, device: str, model: str,
             installed: Callable[[str], str | None] = library_version) -> KnownFailure | None:
        """The first entry matching the case on the installed stack, or None."""
        return next((e for e in self.entries if e.matches(scheme, variant, device, model, installed)), None)


def _parse(raw: Any, path: Path, line: int | None) -> KnownFailure:
    if not isinstance(raw, dict):
        raise ConfigFileError(path, "each [[known]] must be a table", line=line)
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigFileError(path, f"unknown key; known keys: {', '.join(sorted(_KEYS))}", line=line,
                              key=sorted(unknown)[0])
    for key in _REQUIRED:
        if key not in raw:
            raise ConfigFileError(path, "required", line=line, key=key)
    versions = raw["versions"]
    if not isinstance(versions, dict) or not versions:
        raise ConfigFileError(path, "a table of distribution = version specifier, e.g. { torch = \"==2.11.*\" }: "
                              "an entry must name the stack it was seen on", line=line, key="versions")
    parsed = {}
    for dist, spec in versions.items():
        try:
            parsed[dist] = SpecifierSet(str(spec))
        except InvalidSpecifier as exc:
            raise ConfigFileError(path, f"not a version specifier: {exc}", line=line, key=f"versions.{dist}") from None
    names = {key: _as_list(raw[key]) for key in ("model", "scheme", "variant") if key in raw}
    vocabulary = selector_vocabulary()
    for key, values in names.items():
        for value in values:
            if value not in vocabulary[key]:
                raise ConfigFileError(path, f"unknown {key} {value!r}", line=line, key=key)
    if len(names["variant"]) != 1:
        raise ConfigFileError(path, "one variant per entry", line=line, key="variant")
    return KnownFailure(frozenset(names["scheme"]), names["variant"][0], str(raw["device"]), parsed,
                        str(raw["reason"]), str(raw["evidence"]), f"{path}:{line}" if line else str(path),
                        frozenset(names["model"]) if "model" in names else None)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
