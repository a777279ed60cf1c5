"""Fidelity metrics against a reference (bf16 output or golden images).

Relative error is computed here (one line of math); PSNR and SSIM come from torchmetrics'
functional API. Images are float arrays in [0, 1], shaped (N, H, W, 3) as diffusers returns
them with ``output_type="np"``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def relative_error(output: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """||output - reference|| / ||reference|| in float64 (0 for identical, inf against a zero reference)."""
    out = torch.as_tensor(np.asarray(output) if not isinstance(output, torch.Tensor) else output).double()
    ref = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference).double()
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    norm = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(out - ref).item()
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def _nchw(images: np.ndarray) -> torch.Tensor:
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images shaped (N, H, W, 3) or (H, W, 3), got {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all images (data range 1); inf when identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _nchw(images), _nchw(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if torch.equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity (Gaussian window 11, sigma 1.5, as Wang et al. 2004)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _nchw(images), _nchw(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(structural_similarity_index_measure(a, b, data_range=1.0))
