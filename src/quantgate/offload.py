"""CPU offload variants: diffusers' model, sequential and group offloading of a whole pipeline.

They are what a smaller card runs when a pipeline does not fit it, so under a GPU budget
(``--quantgate-gpu-budget``) "quantized without offload vs bf16 with offload" is a measured
speedup. Each loads the pipeline on the CPU (``Variant.loads_on_cpu``) and lets diffusers
move modules onto the accelerator when they run; they are timed end to end like any case.
"""

from __future__ import annotations

from typing import Any

import torch

WHY_GPU_ONLY = "diffusers' offload hooks move modules between the CPU and an accelerator"


def model_offload(pipe: Any, device: str) -> dict[str, Any]:
    """Whole models move to the GPU when called, the previous one back (``enable_model_cpu_offload``)."""
    pipe.enable_model_cpu_offload(device=device)
    return {"offload": "model", "offload_call": "enable_model_cpu_offload"}


def sequential_offload(pipe: Any, device: str) -> dict[str, Any]:
    """Each leaf module's weights move to the GPU for its forward only (``enable_sequential_cpu_offload``)."""
    pipe.enable_sequential_cpu_offload(device=device)
    return {"offload": "sequential", "offload_call": "enable_sequential_cpu_offload"}


# One transformer block per group, copies on a side CUDA stream overlapping compute: diffusers'
# recommended setting for speed (it pins the CPU copies, so it needs host RAM for them).
GROUP_OFFLOAD_OPTIONS: dict[str, Any] = {"offload_type": "block_level", "num_blocks_per_group": 1,
                                         "use_stream": True}


def group_offload(pipe: Any, device: str) -> dict[str, Any]:
    """Groups of blocks move to the GPU ahead of use on a side stream (``enable_group_offload``)."""
    pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                              **GROUP_OFFLOAD_OPTIONS)
    return {"offload": "group", "offload_call": "enable_group_offload", "offload_options": dict(GROUP_OFFLOAD_OPTIONS)}
