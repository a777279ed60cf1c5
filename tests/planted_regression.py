"""A regression planted on purpose, for A/B checks of ``quantgate compare`` (issue 20).

Load it as a plugin, ``pytest -p tests.planted_regression ...``, and every pipeline the session
loads gets a fixed amount of extra work: before each transformer block runs, a forward
pre-hook multiplies a ``SIZE x SIZE`` matrix by itself ``MATMULS`` times. The matrix lives in
the hooks (not a buffer, so the transformer's footprint does not move) and is released with
the pipeline that holds them. The block's inputs and outputs are untouched, so every quality
gate still holds; only time moves. On FLUX.1 at the defaults (3072, the hidden size; 8 per
block over 57 blocks) that is about 26 TFLOP a forward. Two per block were first tried on an
H200 (reports/merge-h200-2026-12-04/ab): the bf16 forward went from 166.4 to 174.7 ms, +5.0%,
which is the comparator's tolerance and so, rightly, "no change". Eight per block should add
about 20% to the forward and 15% end to end. A run with it against a run without must come
out of ``quantgate compare`` as a regression of the transformer and end-to-end timings.

``QUANTGATE_PLANTED_SIZE`` and ``QUANTGATE_PLANTED_MATMULS`` change the amount (the CPU tier's
tiny models need a larger share of their forward). It is test tooling: never a registered
scheme, and a case id does not change, which is the point (the same case, slower).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

SIZE = int(os.environ.get("QUANTGATE_PLANTED_SIZE", "3072"))
MATMULS = int(os.environ.get("QUANTGATE_PLANTED_MATMULS", "8"))


def _blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: every element of a ModuleList whose name ends in ``blocks``."""
    return [block for name, child in denoiser.named_children()
            if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList) for block in child]


def plant(denoiser: torch.nn.Module, size: int = SIZE, matmuls: int = MATMULS) -> dict[str, Any]:
    """Add the extra work to ``denoiser``; return what was planted (the pipeline's notes)."""
    parameter = next(denoiser.parameters())
    dtype = torch.bfloat16 if parameter.device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    # Scaled so that repeated products stay finite: the work, not the values, is the point.
    weight = (torch.randn(size, size, generator=generator) / size ** 0.5).to(parameter.device, dtype)

    def extra_work(module: torch.nn.Module, args: Any) -> None:
        for _ in range(matmuls):
            torch.mm(weight, weight)

    blocks = _blocks(denoiser)
    for block in blocks:
        block.register_forward_pre_hook(extra_work)
    return {"planted_regression": {"size": size, "matmuls_per_block": matmuls, "blocks": len(blocks),
                                   "flop_per_forward": 2 * size ** 3 * matmuls * len(blocks)}}


def _planting(scheme: Any) -> Any:
    original = scheme.post_load

    def post_load(pipe: Any, request: Any) -> dict[str, Any]:
        notes = dict(original(pipe, request)) if original is not None else {}
        notes.update(plant(getattr(pipe, request.spec.denoiser)))
        return notes

    return post_load


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Wrap every registered scheme's ``post_load`` (before the fingerprint at load is taken, so
    the hooks are part of the pipeline as loaded, not a change a test made)."""
    from quantgate import schemes

    for name, scheme in list(schemes.SCHEMES.items()):
        schemes.SCHEMES[name] = dataclasses.replace(scheme, post_load=_planting(scheme))
