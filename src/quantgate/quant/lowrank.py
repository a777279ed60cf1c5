"""Turning SVDQuant's low-rank branch off, to time what it costs (the kernel-fusion question).

One entry per engine, keyed by the class name of its W4A4 linear, so this module imports no
engine: ``disable(module)`` switches one layer's branch off and returns how to switch it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Restore = Callable[[], None]


def _svdquant_ref(module: nn.Module) -> Restore:
    before = module.low_rank
    module.low_rank = False
    return lambda: setattr(module, "low_rank", before)


def _nunchaku_w4a4(module: nn.Module) -> Restore:
    # nunchaku's SVDQW4A4Linear: the fused kernels take the branch as proj_down (in, r) and
    # proj_up (out, r). Rank 0 is nunchaku's own layout for checkpoints without a branch (its
    # V1 loader builds the same zero-width tensors), so the W4A4 path runs alone.
    down, up, rank = module.proj_down, module.proj_up, module.rank
    module.proj_down = nn.Parameter(torch.empty(down.shape[0], 0, dtype=down.dtype, device=down.device),
                                    requires_grad=False)
    module.proj_up = nn.Parameter(torch.empty(up.shape[0], 0, dtype=up.dtype, device=up.device), requires_grad=False)
    module.rank = 0

    def restore() -> None:
        module.proj_down, module.proj_up, module.rank = down, up, rank

    return restore


SWITCHES: dict[str, Callable[[nn.Module], Restore]] = {
    "SVDQuantLinear": _svdquant_ref,  # quantgate.quant.svdquant
    "SVDQW4A4Linear": _nunchaku_w4a4,  # nunchaku.models.linear
}


def low_rank_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer of ``model`` with a low-rank branch that a switch knows."""
    return [m for m in model.modules() if type(m).__name__ in SWITCHES]


@contextmanager
def without_low_rank(model: nn.Module) -> Iterator[int]:
    """Inside the block every known low-rank branch of ``model`` is off; yields how many.

    Raises LookupError when ``model`` has none (not an SVDQuant model).
    """
    layers = low_rank_layers(model)
    if not layers:
        raise LookupError(f"{type(model).__name__} has no low-rank branch (no layer of type "
                          f"{' or '.join(SWITCHES)})")
    restores = [SWITCHES[type(m).__name__](m) for m in layers]
    try:
        yield len(layers)
    finally:
        for restore in reversed(restores):
            restore()
