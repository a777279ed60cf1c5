"""Analytic FLOPs of a denoiser forward, and achieved TFLOP/s against the measured peak.

The count is exact for the model as built from its config: the denoiser runs once on the
meta device (no memory, no arithmetic) under ``torch.utils.flop_counter.FlopCounterMode``,
which adds 2*M*N*K for every matrix product, including attention's two. Elementwise work
(norms, RoPE, activations) is not counted, as is usual for TFLOP/s figures.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from quantgate.measure.footprint import meta_model
from quantgate.measure.timing import cuda_event_times
from quantgate.models.families import DenoiserShape, Family


def forward_flops(model_class: type, config: Mapping[str, Any], family: Family, shape: DenoiserShape) -> int:
    """FLOPs of one forward of the denoiser described by ``config`` at ``shape``."""
    return _cached(model_class, json.dumps(dict(config), sort_keys=True), family, shape)


@functools.lru_cache(maxsize=64)
def _cached(model_class: type, config_json: str, family: Family, shape: DenoiserShape) -> int:
    config = json.loads(config_json)
    model = meta_model(model_class, config)
    inputs = family.denoiser_inputs(config, shape, "meta", torch.bfloat16, None)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    return int(counter.get_total_flops())


def bf16_matmul_peak_tflops(device: str, size: int = 8192, iterations: int = 20) -> float | None:
    """The device's measured dense bf16 matmul rate (median over ``iterations``); None on CPU.

    Random operands (zeros run faster than real data on Hopper), CUDA events, after warm-up.
    """
    if torch.device(device).type != "cuda":
        return None
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    times = sorted(cuda_event_times(lambda: a @ b, device, rounds=iterations, warmup_rounds=3))
    return 2 * size**3 / times[len(times) // 2] / 1e12
