"""CPU offload variants: diffusers' model, sequential and group offloading of a whole pipeline,
and the text encoders alone offloaded with the denoiser resident.

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


def _is_text_encoder(module: torch.nn.Module) -> bool:
    # The text encoders of FLUX.1 and SD3.5 (CLIP, T5) are transformers models; the denoiser and
    # the VAE are diffusers models.
    return type(module).__module__.startswith("transformers.")


# Leaf-level groups, on a side stream where there is one (CUDA): each layer's weights arrive just
# ahead of use, so the GPU holds a layer or two of a text encoder at a time (diffusers' group
# offloading, which also tells the pipeline its execution device; accelerate's cpu_offload alone
# leaves it guessing "meta").
ENCODER_OFFLOAD_OPTIONS: dict[str, Any] = {"offload_type": "leaf_level"}


def encoder_offload(pipe: Any, device: str) -> dict[str, Any]:
    """Text encoders stream from the CPU layer by layer (diffusers' ``apply_group_offloading`` at leaf
    level); the denoiser and the VAE stay on the GPU.

    What a 16 GB card runs with a quantized FLUX.1 transformer: the bf16 T5 (9.5 GB) does not fit
    beside it, and runs once per prompt. The denoiser is already on the device
    (``Variant.denoiser_on_device``); nothing quantized is moved.
    """
    from diffusers.hooks import apply_group_offloading

    target = torch.device(device)
    options = {**ENCODER_OFFLOAD_OPTIONS, "use_stream": target.type == "cuda"}  # the CPU (tests) has no streams
    streamed, moved = [], []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        if _is_text_encoder(module):
            apply_group_offloading(module, onload_device=target, offload_device=torch.device("cpu"), **options)
            streamed.append(name)
        elif any(p.device.type != target.type for p in module.parameters()):
            module.to(target)
            moved.append(name)
    if not streamed:
        raise ValueError(f"{type(pipe).__name__} has no transformers text encoder to offload")
    return {"offload": "encoders", "offload_call": "diffusers.hooks.apply_group_offloading",
            "offload_options": options, "offloaded_components": streamed, "moved_to_device": moved}
