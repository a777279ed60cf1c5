"""Model families: what a denoiser forward takes, and how the pipeline batches it.

The transformer-scope benchmark calls the denoiser directly on fixed seeded inputs shaped
exactly as the family's pipeline shapes them at a given batch, resolution and text length.
A new family is one entry in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from quantgate.errors import UnknownNameError


@dataclass(frozen=True)
class DenoiserShape:
    """The sizes that decide a denoiser forward's cost."""

    batch: int
    height: int
    width: int
    text_tokens: int  # the pipeline's max_sequence_length (T5 tokens)
    vae_scale: int = 8


def _tensor(shape: tuple[int, ...], device: str, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    # Drawn on the CPU so the inputs are identical on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _flux_inputs(config: Mapping[str, Any], s: DenoiserShape, device: str, dtype: torch.dtype,
                 generator: torch.Generator | None) -> dict[str, Any]:
    rows, cols = s.height // s.vae_scale // 2, s.width // s.vae_scale // 2  # 2x2 latent patches
    image_ids = torch.zeros(rows, cols, 3)
    image_ids[..., 1] = torch.arange(rows)[:, None]
    image_ids[..., 2] = torch.arange(cols)[None, :]
    inputs = {
        "hidden_states": _tensor((s.batch, rows * cols, config["in_channels"]), device, dtype, generator),
        "encoder_hidden_states": _tensor((s.batch, s.text_tokens, config["joint_attention_dim"]), device, dtype, generator),
        "pooled_projections": _tensor((s.batch, config["pooled_projection_dim"]), device, dtype, generator),
        "timestep": torch.full((s.batch,), 0.5, device=device, dtype=dtype),  # the pipeline passes t / 1000
        "img_ids": image_ids.reshape(rows * cols, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(s.text_tokens, 3, device=device, dtype=dtype),
        # FluxPipeline passes {} (never None): compiled blocks guard on its type, so a None here
        # recompiled every block for the transformer-scope call after the pipeline had compiled
        # them (on an H200, fp8-row + compile timed 173 ms that way, 103 ms compiled once).
        "joint_attention_kwargs": {},
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((s.batch,), 3.5, device=device, dtype=torch.float32)
    return inputs


def _sd3_inputs(config: Mapping[str, Any], s: DenoiserShape, device: str, dtype: torch.dtype,
                generator: torch.Generator | None) -> dict[str, Any]:
    clip_tokens = 77  # CLIP-L and CLIP-G hidden states, concatenated along features, then T5's tokens
    return {
        "hidden_states": _tensor((s.batch, config["in_channels"], s.height // s.vae_scale, s.width // s.vae_scale),
                                 device, dtype, generator),
        "encoder_hidden_states": _tensor((s.batch, clip_tokens + s.text_tokens, config["joint_attention_dim"]),
                                         device, dtype, generator),
        "pooled_projections": _tensor((s.batch, config["pooled_projection_dim"]), device, dtype, generator),
        # The pipeline passes the scheduler's float32 timesteps.
        "timestep": torch.full((s.batch,), 500.0, device=device, dtype=torch.float32),
        "return_dict": False,
    }


@dataclass(frozen=True)
class Family:
    """How one model family's pipeline drives its denoiser."""

    name: str
    denoiser_inputs: Callable[[Mapping[str, Any], DenoiserShape, str, torch.dtype, torch.Generator | None],
                              dict[str, Any]]
    # How many denoiser rows one image costs per step at a guidance scale (CFG doubles them).
    rows_per_image: Callable[[float], int]


FAMILIES: dict[str, Family] = {
    "flux": Family("flux", _flux_inputs, lambda guidance: 1),  # guidance is embedded, no CFG batch
    "sd3": Family("sd3", _sd3_inputs, lambda guidance: 2 if guidance > 1.0 else 1),
}


def get_family(name: str) -> Family:
    """The registered family called ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownNameError("model family", name, FAMILIES) from None


def vae_scale(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell: 2 ** (number of VAE resolution levels - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)
