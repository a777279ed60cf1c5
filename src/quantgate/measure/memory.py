"""Runtime memory: peak allocated/reserved bytes around a run, and release of cached blocks."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class PeakMemory:
    """Memory seen on one device during a block; fields stay None on the CPU (not measured)."""

    device: str
    allocated_before: int | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None

    @property
    def peak_over_baseline(self) -> int | None:
        """Peak minus what was already allocated (weights): activations and workspaces."""
        if self.peak_allocated is None or self.allocated_before is None:
            return None
        return self.peak_allocated - self.allocated_before

    def as_dict(self) -> dict:
        return {
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
            "allocated_before_bytes": self.allocated_before,
            "peak_over_baseline_bytes": self.peak_over_baseline,
            "measured": self.peak_allocated is not None,
        }


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def allocated_bytes(device: str | torch.device) -> int | None:
    """Bytes currently allocated by torch's caching allocator on ``device`` (None on CPU)."""
    return int(torch.cuda.memory_allocated(device)) if _is_cuda(device) else None


def release_memory(device: str | torch.device) -> None:
    """Collect garbage and return cached blocks to the driver, so allocated bytes are honest."""
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def track_peak(device: str | torch.device) -> Iterator[PeakMemory]:
    """Record the peak allocated and reserved bytes on ``device`` during the block."""
    record = PeakMemory(device=str(device))
    if not _is_cuda(device):
        yield record
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    record.allocated_before = int(torch.cuda.memory_allocated(device))
    try:
        yield record
    finally:
        synchronize(device)
        record.peak_allocated = int(torch.cuda.max_memory_allocated(device))
        record.peak_reserved = int(torch.cuda.max_memory_reserved(device))
