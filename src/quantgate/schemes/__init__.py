"""The scheme registry: one module per backend, each exporting ``SCHEMES``.

Adding a backend is one new module, imported by name below (as diffusers' ``auto.py`` does,
so static tools can follow it), and one entry in ``_BACKENDS``; adding a scheme to an
existing backend is one entry in its ``SCHEMES`` list.
"""

from __future__ import annotations

from types import ModuleType

from quantgate.errors import UnknownNameError
from quantgate.schemes import bf16, bitsandbytes, gptq, nunchaku, sparse, svdquant, torchao
from quantgate.schemes.base import Requirements, Scheme

# The full-precision reference every reduction, speedup and quality figure is measured against
# (its eager variant: quantgate.applicability.BASELINE_VARIANT).
BASELINE = "bf16"

_BACKENDS: tuple[ModuleType, ...] = (bf16, bitsandbytes, torchao, sparse,
                                     svdquant, nunchaku,  # SVDQuant: quantgate's reference, and the nunchaku engine
                                     gptq)  # quantgate's own GPTQ / RTN W4A8


def _load() -> dict[str, Scheme]:
    registry: dict[str, Scheme] = {}
    for module in _BACKENDS:
        for scheme in module.SCHEMES:
            if scheme.name in registry:
                raise ValueError(f"scheme {scheme.name!r} is registered twice (in {module.__name__})")
            registry[scheme.name] = scheme
    if BASELINE not in registry:
        raise ValueError(f"the baseline scheme {BASELINE!r} is not registered")
    return registry


SCHEMES: dict[str, Scheme] = _load()


def scheme_names() -> list[str]:
    """Names of every registered scheme, in registration order."""
    return list(SCHEMES)


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``; an unknown name lists the valid ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise UnknownNameError("scheme", name, SCHEMES) from None


def scheme_markers() -> set[str]:
    """Every pytest marker a scheme adds to its cases (``bnb``, ``torchao`` ...)."""
    return {marker for scheme in SCHEMES.values() for marker in scheme.markers}


__all__ = ["BASELINE", "Requirements", "Scheme", "SCHEMES", "get_scheme", "scheme_markers", "scheme_names"]
