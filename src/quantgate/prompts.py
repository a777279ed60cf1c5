"""Prompt sets: UTF-8 text files, one prompt per line, ``#`` starts a comment line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantgate.errors import ConfigFileError


@dataclass(frozen=True)
class PromptSet:
    """An ordered, non-empty list of prompts."""

    path: Path
    prompts: tuple[str, ...]

    def take(self, n: int) -> list[str]:
        """The first ``n`` prompts, cycling when the file holds fewer (a batch of 16 from 8)."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        """Read a prompt file; an empty or undecodable file is an error naming it."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ConfigFileError(path, "prompt file not found (pass --quantgate-prompts FILE)") from None
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise ConfigFileError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line=line) from None
        prompts = tuple(s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#"))
        if not prompts:
            raise ConfigFileError(path, "holds no prompts (one per line; '#' lines are comments)")
        return cls(path, prompts)
