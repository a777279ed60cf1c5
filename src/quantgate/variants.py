"""Execution variants of a loaded pipeline (eager today; torch.compile joins as one entry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantgate.errors import UnknownNameError


@dataclass(frozen=True)
class Variant:
    """How a loaded pipeline is prepared before it runs."""

    name: str
    summary: str
    # Prepares the pipeline in place; returns facts to record (what was compiled, excluded...).
    apply: Callable[[Any, str], dict[str, Any]]


VARIANTS: dict[str, Variant] = {
    "eager": Variant("eager", "PyTorch eager mode, no compilation", lambda pipe, denoiser: {}),
}


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownNameError("variant", name, VARIANTS) from None
