"""FID (Heusel et al. 2017) through torchmetrics, only with the real Inception weights found locally.

torchmetrics' ``FrechetInceptionDistance`` extracts features with torch-fidelity's
``FeatureExtractorInceptionV3`` (the TensorFlow FID Inception, converted). Given no weights
path, torch-fidelity calls ``torch.hub.load_state_dict_from_url`` on
``URL_INCEPTION_V3``, which reads ``torch.hub.get_dir()/checkpoints/<file name of the URL>``
(``$TORCH_HOME/hub/checkpoints``) and downloads when the file is absent. quantgate never lets
it download: it resolves the file itself (a configured path, else that cache file) and hands
the path to torchmetrics, so a missing file is a skip naming it, never a download or a
random network. A wrong file fails torch's strict ``load_state_dict``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from quantgate.quality.perceptual import hub_checkpoint

# torch-fidelity 0.4.0 (the newest, and the highest torchmetrics 1.9 accepts):
# torch_fidelity/feature_extractor_inceptionv3.py, URL_INCEPTION_V3.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
FID_WEIGHTS_ENV = "QUANTGATE_FID_WEIGHTS"
# What the Inception sees: torchmetrics resizes to 299 itself, but a batch needs one size, and
# reference sets (COCO) mix sizes and aspect ratios; both sides get the same treatment.
FID_IMAGE_SIZE = 299
FID_PREPROCESSING = f"RGB, center crop to a square, bicubic resize to {FID_IMAGE_SIZE}x{FID_IMAGE_SIZE}, uint8"


def inception_checkpoint() -> Path:
    """Where torch-fidelity (through torch.hub) looks for its Inception weights."""
    return hub_checkpoint(INCEPTION_FILE)


def fid_weights(configured: str | os.PathLike[str] | None = None) -> Path:
    """The weights file FID will load: ``configured``, else ``$QUANTGATE_FID_WEIGHTS``, else the hub cache."""
    chosen = configured or os.environ.get(FID_WEIGHTS_ENV)
    return Path(chosen).expanduser() if chosen else inception_checkpoint()


def fid_problem(configured: str | os.PathLike[str] | None = None) -> str | None:
    """Why FID cannot run here (naming the exact file and directory to provide), or None."""
    problems = []
    if importlib.util.find_spec("torch_fidelity") is None:
        problems.append("FID needs torch-fidelity (torchmetrics' Inception feature extractor), which is not "
                        "importable here: pip install torch-fidelity (or torchmetrics[image])")
    path = fid_weights(configured)
    if not path.is_file():
        if configured or os.environ.get(FID_WEIGHTS_ENV):
            problems.append(f"FID's configured Inception weights file {path} does not exist")
        else:
            problems.append(f"FID needs torch-fidelity's pretrained Inception weights {INCEPTION_FILE} in "
                            f"{path.parent}: copy the file there (it is {INCEPTION_URL}), point TORCH_HOME at a "
                            f"directory whose hub/checkpoints holds it, or pass --fid-weights FILE "
                            f"(${FID_WEIGHTS_ENV}); quantgate never downloads during a run")
    return "; ".join(problems) or None


def fid_pixels(image: PIL.Image.Image) -> torch.Tensor:  # noqa: F821 - PIL is imported by callers
    """One image as FID's input: (3, 299, 299) uint8 after ``FID_PREPROCESSING``."""
    from PIL import Image

    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((FID_IMAGE_SIZE, FID_IMAGE_SIZE),
                                                                    Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class FidAccumulator:
    """FID over streamed batches of real and generated images (torchmetrics keeps running sums).

    By default the Inception network with the resolved real weights (``fid_problem`` must be
    None). ``feature`` injects another feature extractor (an ``nn.Module`` mapping the batches
    given to ``update`` to (N, d) features): torchmetrics' own hook, used by the harness's tests
    with a random module; a distance from it is not FID and quantgate never reports it as FID.
    """

    def __init__(self, weights: str | os.PathLike[str] | None = None, device: str = "cpu",
                 feature: torch.nn.Module | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if feature is None:
            problem = fid_problem(weights)
            if problem:
                raise RuntimeError(problem)
            self.weights: Path | None = fid_weights(weights)
            metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                              feature_extractor_weights_path=str(self.weights))
        else:
            self.weights = None
            metric = FrechetInceptionDistance(feature=feature, normalize=True)
        self.metric = metric.to(device)
        self.device = device

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch: uint8 (N, 3, 299, 299) for Inception, whatever ``feature`` takes otherwise."""
        with torch.inference_mode():
            self.metric.update(images.to(self.device), real=real)

    def update_files(self, paths: Iterable[Path], real: bool, batch: int = 32) -> int:
        """Add images read from ``paths`` (preprocessed by ``fid_pixels``); return how many."""
        from PIL import Image

        count, chunk = 0, []
        for path in paths:
            with Image.open(path) as image:
                chunk.append(fid_pixels(image))
            if len(chunk) == batch:
                self.update(torch.stack(chunk), real)
                count, chunk = count + len(chunk), []
        if chunk:
            self.update(torch.stack(chunk), real)
            count += len(chunk)
        return count

    def compute(self) -> float:
        """The Frechet distance of the two feature distributions seen so far."""
        return float(self.metric.compute())
