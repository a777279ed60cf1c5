"""Quality metrics against known values, and the golden image store's guarantees."""

import json
import math

import numpy as np
import pytest
import torch

from quantgate.quality.golden import GoldenInvalid, GoldenMissing, load_golden, write_golden
from quantgate.quality.grids import sample_grid
from quantgate.quality.metrics import psnr, relative_error, ssim
from tests.conftest import REPO

RNG = np.random.default_rng(0)
IMAGES = RNG.random((2, 32, 32, 3))
SETTINGS = {"scheme": "bf16", "num_inference_steps": 4, "guidance_scale": 0.0, "height": 32, "width": 32,
            "max_sequence_length": 256, "weights": "seed 0, test"}
PAIRS = [("a red fox", 0), ("a lighthouse", 1)]


def test_relative_error_of_known_tensors():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.tensor([3.0, 5.0]), ref) == pytest.approx(1 / 5)  # ||(0, 1)|| / ||(3, 4)||
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(torch.zeros(2), torch.zeros(3))


def test_psnr_of_identical_and_offset_images():
    assert psnr(IMAGES, IMAGES) == math.inf
    flat = np.full((1, 8, 8, 3), 0.5)
    # a uniform offset of 0.1 on data range 1: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    assert psnr(flat + 0.1, flat) == pytest.approx(20.0, abs=1e-6)


def test_ssim_is_one_for_identical_and_drops_for_a_shifted_image():
    assert ssim(IMAGES, IMAGES) == pytest.approx(1.0)
    smooth = np.clip(np.cumsum(RNG.random((1, 64, 64, 3)), axis=2) / 64, 0, 1)
    shifted = np.roll(smooth, 3, axis=2)
    assert ssim(shifted, smooth) < 0.99
    with pytest.raises(ValueError, match="expected images shaped"):
        ssim(np.zeros((4, 4)), np.zeros((4, 4)))


def test_a_golden_set_round_trips_within_8_bit_rounding(tmp_path):
    written = write_golden(tmp_path, "flux-schnell", "tiny", SETTINGS,
                           [(p, s, img) for (p, s), img in zip(PAIRS, IMAGES, strict=True)], {"device": "test"})
    loaded = load_golden(tmp_path, "flux-schnell", "tiny", SETTINGS, PAIRS)
    assert [i.file for i in loaded.images] == ["00-seed0.png", "01-seed1.png"] == [i.file for i in written.images]
    assert np.abs(loaded.array(1) - IMAGES[1]).max() <= 0.5 / 255 + 1e-6
    assert loaded.manifest["device"] == "test" and loaded.manifest["settings"] == SETTINGS


def test_a_missing_golden_set_says_how_to_create_it(tmp_path):
    with pytest.raises(GoldenMissing, match="quantgate golden sd35-medium --source tiny"):
        load_golden(tmp_path, "sd35-medium", "tiny", SETTINGS, PAIRS)


@pytest.fixture
def golden(tmp_path):
    images = [(p, s, img) for (p, s), img in zip(PAIRS, IMAGES, strict=True)]
    write_golden(tmp_path, "flux-schnell", "tiny", SETTINGS, images, {})
    return tmp_path / "flux-schnell" / "tiny"


def test_a_tampered_image_is_an_error_not_a_comparison(golden):
    image = golden / "01-seed1.png"
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(GoldenInvalid, match="01-seed1.png does not match the sha256"):
        load_golden(golden.parents[1], "flux-schnell", "tiny", SETTINGS, PAIRS)


def test_a_missing_image_is_an_error(golden):
    (golden / "00-seed0.png").unlink()
    with pytest.raises(GoldenInvalid, match="00-seed0.png is listed in manifest.json but missing"):
        load_golden(golden.parents[1], "flux-schnell", "tiny", SETTINGS, PAIRS)


def test_a_stale_manifest_is_refused(golden):
    with pytest.raises(GoldenInvalid, match="num_inference_steps 4 \\(this run: 8\\)"):
        load_golden(golden.parents[1], "flux-schnell", "tiny", {**SETTINGS, "num_inference_steps": 8}, PAIRS)
    with pytest.raises(GoldenInvalid, match="weights 'seed 0, test' \\(this run: 'seed 1, test'\\)"):
        load_golden(golden.parents[1], "flux-schnell", "tiny", {**SETTINGS, "weights": "seed 1, test"}, PAIRS)
    with pytest.raises(GoldenInvalid, match="was made for prompt 'a red fox' seed 0"):
        load_golden(golden.parents[1], "flux-schnell", "tiny", SETTINGS, [("a blue fox", 0)])
    manifest = golden / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(GoldenInvalid, match="is unreadable"):
        load_golden(golden.parents[1], "flux-schnell", "tiny", SETTINGS, PAIRS)


def test_a_failed_rewrite_keeps_the_previous_set(golden):
    with pytest.raises(ValueError):
        write_golden(golden.parents[1], "flux-schnell", "tiny", SETTINGS,
                     [("a red fox", 0, IMAGES[0]), ("a lighthouse", 1, np.zeros((2, 2)))], {})  # not RGB
    assert load_golden(golden.parents[1], "flux-schnell", "tiny", SETTINGS, PAIRS).images[0].file == "00-seed0.png"


@pytest.mark.parametrize("model", ["flux-schnell", "flux-dev", "sd35-medium"])
def test_the_committed_tiny_golden_sets_verify(model):
    manifest = json.loads((REPO / "golden_images" / model / "tiny" / "manifest.json").read_text())
    pairs = [(i["prompt"], i["seed"]) for i in manifest["images"]]
    golden = load_golden(REPO / "golden_images", model, "tiny", manifest["settings"], pairs)
    assert len(golden.images) == 4 and golden.settings["weights"].startswith("seed 0, " + model + "-tiny-")


def test_a_sample_grid_has_a_column_per_set_and_a_row_per_prompt(tmp_path):
    from PIL import Image

    path = sample_grid({"golden": IMAGES, "int8-wo eager": IMAGES[::-1]}, ["a red fox", "a lighthouse"],
                       tmp_path / "grid.png", cell=32)
    with Image.open(path) as im:
        assert im.size == (2 * 36 + 4, 18 + 2 * (32 + 4 + 18) + 4)


def test_two_golden_writers_at_once_each_leave_a_whole_set(tmp_path):
    import threading

    errors = []

    def write(offset):
        try:
            for _ in range(5):
                shifted = [np.clip(img + offset, 0, 1) for img in IMAGES]
                write_golden(tmp_path, "flux-schnell", "tiny", SETTINGS,
                             [(p, s, img) for (p, s), img in zip(PAIRS, shifted, strict=True)], {})
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(d,)) for d in (0.0, 0.1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(load_golden(tmp_path, "flux-schnell", "tiny", SETTINGS, PAIRS).images) == len(PAIRS)
