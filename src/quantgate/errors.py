"""Exceptions shared across quantgate, each carrying a sentence a user can act on."""

from __future__ import annotations

from collections.abc import Iterable


class QuantgateError(Exception):
    """Base class of every error quantgate raises on purpose."""


class UnknownNameError(QuantgateError, KeyError):
    """A model, scheme, source or variant name that no registry holds."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.args[0]


class ConfigFileError(QuantgateError, ValueError):
    """A data file (gates, model registry, prompts) that cannot be used as written."""

    def __init__(self, path: object, message: str, line: int | None = None, key: str | None = None):
        self.path, self.line, self.key = path, line, key
        where = f"{path}:{line}" if line else str(path)
        what = f" [{key}]" if key else ""
        super().__init__(f"{where}{what}: {message}")


class OptionValueError(QuantgateError, ValueError):
    """A command-line or ini option whose value cannot be used; the message names the option as given.

    Raised by the helpers both the plugin and the CLI use (``quantgate.settings``): the plugin
    turns it into ``pytest.UsageError``, the ``quantgate`` command prints it and exits 2.
    """


class SourceUnavailable(QuantgateError):
    """The weights a source needs are not on this machine; a test using them is skipped."""


class SourceInvalid(QuantgateError, ValueError):
    """A directory the user pointed at is not a usable diffusers pipeline: a usage error."""


class PipelineBuildError(QuantgateError, RuntimeError):
    """Loading or quantizing a pipeline failed; raised with the original error's message."""


class DiskFull(QuantgateError, OSError):
    """A write ran out of disk space; the message names the file, what is free and how to free more."""
