"""FID: local-weights resolution with exact skip reasons, and the Frechet distance math.

The math and plumbing tests inject torchmetrics' custom ``feature`` module (an identity on
feature vectors, or a tiny random conv net on images). Their distances check how quantgate
feeds torchmetrics and that the formula is right; they are not FID and are never reported as
FID (``fid_metric`` labels such an entry ``custom`` and gives it no ``value``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from quantgate.evaluation import fid_metric
from quantgate.quality import fid

HAS_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


def test_fid_names_the_exact_file_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV, raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert fid.inception_checkpoint() == expected
    problem = fid.fid_problem()
    assert f"weights-inception-2015-12-05-6726825d.pth in {expected.parent}" in problem
    assert fid.INCEPTION_URL in problem and "--fid-weights" in problem and "never downloads" in problem
    assert ("torch-fidelity" in problem and "not importable" in problem) != HAS_FIDELITY


def test_fid_configured_weights_override_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    missing = tmp_path / "nowhere" / "inception.pth"
    assert fid.fid_problem(missing) == (
        ("FID needs torch-fidelity (torchmetrics' Inception feature extractor), which is not importable here: "
         "pip install torch-fidelity (or torchmetrics[image]); " if not HAS_FIDELITY else "")
        + f"FID's configured Inception weights file {missing} does not exist")
    present = tmp_path / "inception.pth"
    present.write_bytes(b"not checked here: torch's strict load_state_dict rejects a wrong file")
    monkeypatch.setenv(fid.FID_WEIGHTS_ENV, str(present))
    assert fid.fid_weights() == present
    # With the weights found, only a missing torch-fidelity can stop FID.
    assert fid.fid_problem() == (None if HAS_FIDELITY else
                                 "FID needs torch-fidelity (torchmetrics' Inception feature extractor), which is not "
                                 "importable here: pip install torch-fidelity (or torchmetrics[image])")


class _Features(torch.nn.Module):
    """Identity on (N, d) feature vectors: the distance is then computed on known samples."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def _distance(real: np.ndarray, fake: np.ndarray) -> float:
    acc = fid.FidAccumulator(feature=_Features(real.shape[1]))
    acc.update(torch.from_numpy(real), real=True)
    acc.update(torch.from_numpy(fake), real=False)
    return acc.compute()


def test_frechet_distance_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    assert _distance(x, x) == pytest.approx(0.0, abs=1e-5)
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    assert _distance(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-5)  # ||mu1 - mu2||^2
    # y = a x + b: cov_y = a^2 cov_x, sqrt(cov_x cov_y) = a cov_x, so
    # FID = ||(1 - a) mu_x - b||^2 + (1 - a)^2 tr(cov_x), with the unbiased sample statistics.
    a, b = 1.7, rng.normal(size=6)
    mu, cov = x.mean(axis=0), np.cov(x, rowvar=False)
    expected = float(np.sum(((1 - a) * mu - b) ** 2) + (1 - a) ** 2 * np.trace(cov))
    assert _distance(x, a * x + b) == pytest.approx(expected, rel=1e-4)


class _TinyConv(torch.nn.Module):
    """A random conv net on (N, 3, 299, 299) uint8 images: plumbing only, never FID."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean(dim=(2, 3))


def test_fid_metric_plumbing_on_image_files_with_an_injected_feature(tmp_path):
    rng = np.random.default_rng(1)
    files = []
    for i, size in enumerate([(40, 64), (64, 40), (50, 50), (33, 70)]):  # mixed sizes and aspect ratios
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        files.append(path)
    assert fid.fid_pixels(Image.open(files[0])).shape == (3, 299, 299)
    same = fid_metric(files, files, feature=_TinyConv())
    assert same["feature_extractor"] == "custom" and "value" not in same
    assert same["generated"] == same["reference"] == 4 and same["preprocessing"] == fid.FID_PREPROCESSING
    assert same["custom_distance"] == pytest.approx(0.0, abs=1e-6)
    dark = tmp_path / "dark"
    dark.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 64, (48, 48, 3), dtype=np.uint8)).save(dark / f"{i}.png")
    different = fid_metric(files, sorted(dark.iterdir()), feature=_TinyConv())
    assert different["reference"] == 3 and different["custom_distance"] > 1e-4
    assert "at least 2" in fid_metric(files[:1], files, feature=_TinyConv())["skipped"]


def test_inception_path_loads_the_configured_file_and_never_downloads(tmp_path, monkeypatch):
    """torchmetrics + torch-fidelity's Inception, loading a file quantgate resolved.

    The file holds *random* Inception weights made here (torch-fidelity's network, its real
    weights are not on the machines that run this): the distance computed from them checks the
    loading path only and is not FID.
    """
    inception = pytest.importorskip(
        "torch_fidelity.feature_extractor_inceptionv3",
        reason="the Inception path needs torch-fidelity: pip install torch-fidelity (torchmetrics[image])")

    def no_download(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download its weights")

    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with monkeypatch.context() as patch:  # build the network once without weights, to save random ones
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr(torch, "load", lambda *a, **k: None)
        torch.manual_seed(0)
        state = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused").state_dict()
    weights = tmp_path / "inception-random.pth"
    torch.save(state, weights)
    assert "weights-inception-2015-12-05-6726825d.pth" in fid.fid_problem()  # the cache is empty
    assert fid.fid_problem(weights) is None
    acc = fid.FidAccumulator(weights)
    assert acc.weights == weights
    loaded = acc.metric.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, fid.FID_IMAGE_SIZE, fid.FID_IMAGE_SIZE), dtype=np.uint8))
    acc.update(images, real=True)
    acc.update(images, real=False)
    assert acc.compute() == pytest.approx(0.0, abs=1e-2)  # the same images: the distance of equal sets
