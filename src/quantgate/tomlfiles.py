"""Reading quantgate's TOML data files (gates, known failures) with errors that name the line."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path, what: str, missing: str) -> tuple[dict[str, Any], str]:
    """``path`` parsed, and its text; ConfigFileError (``missing`` when absent) names file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(path, missing) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, f"cannot read {what}: {exc}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))  # tomllib gained .lineno only in 3.14
        line = getattr(exc, "lineno", None) or (int(found.group(1)) if found else None)
        raise ConfigFileError(path, f"not valid TOML: {exc}", line=line) from None


def table_lines(text: str, table: str) -> list[int]:
    """The line of each ``[[table]]`` header, in order (tomllib keeps no positions)."""
    return [i + 1 for i, line in enumerate(text.splitlines()) if re.match(rf"^\s*\[\[\s*{table}\s*\]\]", line)]
