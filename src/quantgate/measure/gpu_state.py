"""The GPU's state around timed rounds, read through NVML: clocks, temperature, power, throttling.

Two timings of the same code differ when the GPU ran at other clocks: a benchmark records the
state at the start and at the end of its timed rounds (``gpu_state`` in ``extra_info``), and
one during which the GPU slowed itself down (power cap, thermal or hardware slowdown) is
marked ``throttled``. Off CUDA, or without ``nvidia-ml-py``, nothing is read and the record
says why.
"""

from __future__ import annotations

from typing import Any

# NVML's clocks-event (throttle) reasons that slow the GPU down, by bit. Idle, application
# clocks and sync boost are not slowdowns of a busy GPU.
SLOWDOWNS = {
    0x0000000000000004: "sw_power_cap",
    0x0000000000000008: "hw_slowdown",
    0x0000000000000020: "sw_thermal_slowdown",
    0x0000000000000040: "hw_thermal_slowdown",
    0x0000000000000080: "hw_power_brake_slowdown",
    0x0000000000000100: "display_clock_setting",
}


def _handle(pynvml: Any, device: str) -> Any:
    import torch

    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:  # NVML counts every GPU; torch only the visible ones (CUDA_VISIBLE_DEVICES)
        domain, dev = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0".encode())
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def read(device: str) -> dict[str, Any]:
    """The state of ``device`` now: SM and memory clocks (MHz), temperature (C), power (W) and the
    active slowdown reasons; ``{"available": False, "why": ...}`` where it cannot be read."""
    if not str(device).startswith("cuda"):
        return {"available": False, "why": "not a CUDA device"}
    try:
        import pynvml
    except ImportError:
        return {"available": False, "why": "nvidia-ml-py is not installed: pip install nvidia-ml-py"}
    try:
        pynvml.nvmlInit()
        handle = _handle(pynvml, device)
        reasons = int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)) if hasattr(
            pynvml, "nvmlDeviceGetCurrentClocksEventReasons") else int(
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        return {
            "available": True,
            "sm_clock_mhz": int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "memory_clock_mhz": int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
            "max_sm_clock_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "temperature_c": int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            "power_w": round(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1),
            "power_limit_w": round(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000, 1),
            "slowdowns": [name for bit, name in SLOWDOWNS.items() if reasons & bit],
        }
    except Exception as exc:  # noqa: BLE001 - NVML refusing (a VM without it) leaves the state unknown
        return {"available": False, "why": f"NVML: {type(exc).__name__}: {exc}"}


def around(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The record of one benchmark: both readings and whether the GPU slowed itself down in between."""
    slowdowns = sorted(set(start.get("slowdowns") or []) | set(end.get("slowdowns") or []))
    return {"start": start, "end": end, "throttled": bool(slowdowns) if start.get("available") else None,
            "slowdowns": slowdowns}
