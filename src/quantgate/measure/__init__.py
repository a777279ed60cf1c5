"""Measurements: static footprint, peak memory, synchronized timing."""

from quantgate.measure.footprint import Footprint, module_footprint, reference_bytes
from quantgate.measure.memory import PeakMemory, allocated_bytes, release_memory, track_peak
from quantgate.measure.timing import pedantic, synchronized

__all__ = ["Footprint", "PeakMemory", "allocated_bytes", "module_footprint", "pedantic", "reference_bytes",
           "release_memory", "synchronized", "track_peak"]
