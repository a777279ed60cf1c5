"""A GPU memory budget: check on a big card what a smaller card would do.

``--quantgate-gpu-budget 16GiB`` does two things on CUDA:

1. It caps torch's caching allocator for the process (``torch.cuda.set_per_process_memory_fraction``)
   so an allocation that would take the process past the budget raises out-of-memory, as
   on the smaller card. Memory held outside torch's allocator (the CUDA context, library
   handles) counts toward a card's size too, so it is subtracted from what torch may take.
2. After a case ran, its peak reserved bytes plus that outside memory are compared with
   the budget (gate metric ``gpu_budget_fraction_used``, at most 1 to fit), so a case that
   only fits by exceeding the budget (memory outside the cap grew, the cap could not be
   set) fails with measured vs budget.

The decisions are pure functions of a :class:`DeviceMemory` snapshot, tested with a
simulated device; :func:`snapshot` and :func:`apply_cap` are the only parts touching CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantgate.units import format_size, parse_size

GIB = 2**30


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory as the driver and torch see it, in bytes."""

    total: int
    free: int
    reserved: int  # held by torch's caching allocator now

    @property
    def outside_torch(self) -> int:
        """Used on the device but not by torch's allocator (CUDA context, other libraries)."""
        return max(self.total - self.free - self.reserved, 0)


@dataclass(frozen=True)
class AllocatorCap:
    """What the allocator may take under a budget: ``fraction`` of the device, or no cap."""

    budget: int
    total: int
    outside_torch: int
    fraction: float | None  # None: the budget is at least the device, nothing to cap
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "device_total_bytes": self.total, "outside_torch_bytes":
                self.outside_torch, "allocator_fraction": self.fraction, "note": self.note}


class BudgetTooSmall(ValueError):
    """The budget is used up before torch allocates anything."""


def budget_label(budget: int) -> str:
    """How gates name a budget: ``16GiB`` for whole GiB, else bytes (``16000MiB`` -> ``16000MiB``)."""
    if budget % GIB == 0:
        return f"{budget // GIB}GiB"
    if budget % 2**20 == 0:
        return f"{budget // 2**20}MiB"
    return f"{budget}B"


def parse_budget(text: str) -> int:
    """Bytes of a ``--quantgate-gpu-budget`` value (``16GiB``, ``24GB``, ``16000MiB``)."""
    return parse_size(text)


def plan_cap(budget: int, memory: DeviceMemory) -> AllocatorCap:
    """The allocator fraction that keeps this process within ``budget`` on ``memory``'s device."""
    outside = memory.outside_torch
    if budget >= memory.total:
        return AllocatorCap(budget, memory.total, outside, None,
                            f"the budget ({format_size(budget)}) is at least the device's memory "
                            f"({format_size(memory.total)}): nothing to cap")
    allowed = budget - outside
    if allowed <= 0:
        raise BudgetTooSmall(f"a GPU budget of {format_size(budget)} is used up by the {format_size(outside)} "
                             f"already held outside torch (CUDA context, libraries) on this device")
    return AllocatorCap(budget, memory.total, outside, allowed / memory.total,
                        f"torch may reserve {format_size(allowed)} of {format_size(memory.total)} "
                        f"({format_size(outside)} is held outside torch)")


def fraction_used(peak_reserved: int, outside_torch: int, budget: int) -> float:
    """The gate value: (peak reserved by torch + memory outside torch) / budget; above 1 does not fit."""
    return (peak_reserved + outside_torch) / budget


def snapshot(device: Any = None) -> DeviceMemory:
    """The current :class:`DeviceMemory` of a CUDA device (initializes CUDA)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total=int(total), free=int(free), reserved=int(torch.cuda.memory_reserved(device)))


def apply_cap(cap: AllocatorCap, device: Any = None) -> None:
    """Set torch's per-process allocator fraction (no-op when there is nothing to cap)."""
    import torch

    if cap.fraction is not None:
        torch.cuda.set_per_process_memory_fraction(cap.fraction, device)
