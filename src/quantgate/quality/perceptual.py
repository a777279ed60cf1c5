"""Learned perceptual metrics: LPIPS and CLIP score, only with real pretrained weights found locally.

Both come from torchmetrics. Neither may ever download during a run, and a network with
random weights must never be reported as LPIPS or CLIP: each metric first resolves the exact
pretrained files it needs on this machine and, if one is missing, says which file to provide
and where. ``problem()`` answers that question without importing anything heavy.

- LPIPS (Zhang et al. 2018): torchmetrics ships the linear calibration layers; the backbone is
  torchvision's ImageNet checkpoint, which torchvision looks up in
  ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``) before downloading.
- CLIP score (Hessel et al. 2021): a Hugging Face CLIP checkpoint (default
  ``openai/clip-vit-large-patch14``, as torchmetrics and the SD3.5 plan use; MLPerf's SDXL
  benchmark uses ViT-B/32 weights) from a local directory or the offline HF cache, scored
  with transformers directly. quantgate reports the cosine of the image and prompt
  embeddings (torchmetrics reports ``100 * max(cosine, 0)``; the SD3.5 plan asks > 0.28).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# torchvision's checkpoint file for each LPIPS backbone (torchvision.models.*_Weights.DEFAULT).
LPIPS_BACKBONES: dict[str, tuple[str, str]] = {
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
# Files a CLIP checkpoint directory needs, each as alternatives (hub checkpoints carry
# preprocessor_config.json; transformers 5 saves processor_config.json).
_CLIP_FILES: tuple[tuple[str, ...], ...] = (
    ("config.json",), ("preprocessor_config.json", "processor_config.json"), ("tokenizer_config.json",),
    ("vocab.json",), ("merges.txt",), ("model.safetensors", "pytorch_model.bin"))


def hub_checkpoint(file_name: str) -> Path:
    """Where torch.hub's ``load_state_dict_from_url`` looks for ``file_name`` before downloading."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def lpips_checkpoint(net: str = "alex") -> Path:
    """Where torchvision looks for the LPIPS backbone's ImageNet weights."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {', '.join(LPIPS_BACKBONES)}")
    return hub_checkpoint(LPIPS_BACKBONES[net][1])


def lpips_problem(net: str = "alex") -> str | None:
    """Why LPIPS with backbone ``net`` cannot run here (naming the file to provide), or None."""
    if importlib.util.find_spec("torchvision") is None:
        return (f"LPIPS ({net}) needs torchvision for its backbone, which is not importable here: install the "
                "torchvision build that matches this torch")
    path = lpips_checkpoint(net)
    if not path.is_file():
        name = path.name
        return (f"LPIPS ({net}) needs torchvision's pretrained {LPIPS_BACKBONES[net][0]} weights at {path}: copy "
                f"{name} there (it is {_TORCHVISION_URL}{name}) or point TORCH_HOME at a directory whose "
                "hub/checkpoints holds it; quantgate never downloads during a run")
    return None


def lpips(images: np.ndarray, reference: np.ndarray, net: str = "alex", device: str = "cpu") -> float:
    """Mean LPIPS distance between images and reference, both (N, H, W, 3) floats in [0, 1]."""
    problem = lpips_problem(net)
    if problem:
        raise RuntimeError(problem)
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity

    a = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
    b = torch.from_numpy(np.asarray(reference, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    with torch.inference_mode():
        return float(learned_perceptual_image_patch_similarity(a, b, net_type=net, normalize=True, reduction="mean"))


@dataclass(frozen=True)
class ClipCheckpoint:
    """A resolved local CLIP checkpoint directory."""

    name: str
    directory: Path


def _hub_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def resolve_clip(model: str = DEFAULT_CLIP_MODEL) -> ClipCheckpoint | str:
    """The local checkpoint for ``model`` (a directory or a hub repo id in the offline HF cache),
    or a sentence naming the files that are missing."""
    directory = Path(model).expanduser()
    if not directory.is_dir():
        snapshot = _hub_snapshot(model) if "/" in model and not model.startswith((".", "/", "~")) else None
        if snapshot is None:
            return (f"CLIP score needs the pretrained CLIP checkpoint {model!r}: no such directory and it is not in "
                    "the Hugging Face cache (HF_HUB_CACHE); download it beforehand (`hf download "
                    f"{model}`) or pass --quantgate-clip-model DIR holding "
                    f"{', '.join(' or '.join(names) for names in _CLIP_FILES)}")
        directory = snapshot
    missing = [" or ".join(names) for names in _CLIP_FILES if not any((directory / n).is_file() for n in names)]
    if missing:
        return f"CLIP checkpoint {model!r} at {directory} lacks {', '.join(missing)}"
    return ClipCheckpoint(model, directory)


def clip_problem(model: str = DEFAULT_CLIP_MODEL) -> str | None:
    """Why CLIP score with ``model`` cannot run here, or None."""
    resolved = resolve_clip(model)
    return resolved if isinstance(resolved, str) else None


class ClipScorer:
    """CLIP score (cosine of image and prompt embeddings) with one loaded local checkpoint."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str = "cpu"):
        resolved = resolve_clip(model)
        if isinstance(resolved, str):
            raise RuntimeError(resolved)
        from transformers import CLIPModel, CLIPProcessor

        self.checkpoint = resolved
        self.device = device
        self.model = CLIPModel.from_pretrained(resolved.directory, local_files_only=True,
                                               use_safetensors=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(resolved.directory, local_files_only=True)

    def cosines(self, images: np.ndarray, prompts: list[str]) -> list[float]:
        """One cosine per (image, prompt) pair; images (N, H, W, 3) floats in [0, 1].

        Computed from the model's own projected embeddings: torchmetrics 1.9's ``clip_score``
        breaks on transformers 5, whose ``get_image_features`` returns an output object.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        pixels = list((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
        inputs = self.processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image * text).sum(dim=-1).tolist()

    def mean(self, images: np.ndarray, prompts: list[str]) -> float:
        """Mean cosine over the pairs."""
        values = self.cosines(images, prompts)
        return sum(values) / len(values)
