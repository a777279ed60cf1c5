"""Quality claims: each scheme's images and transformer output stay close to the bf16 reference.

Images are compared with the golden set of the model and source (golden_images/), else with
this session's bf16 eager images; the transformer output with bf16's on the same seeded inputs.
With synthetic weights only these numerical gates apply: the images are not meaningful.
"""

import numpy as np
import pytest

from quantgate.quality.metrics import psnr, relative_error, ssim

pytestmark = [pytest.mark.quality, pytest.mark.per_pipeline]


def test_images_match_the_reference(case, pipeline, reference, gates):
    """Each gate prompt, one image per seed, lands within the gate's PSNR and SSIM of the reference."""
    images = np.concatenate([pipeline.generate(case, [prompt], seed=seed) for prompt, seed in reference.pairs])

    expected, _ = reference.images(images)

    gates.require_all({"image_psnr_db_vs_reference": psnr(images, expected),
                       "image_ssim_vs_reference": ssim(images, expected)})


def test_transformer_output_matches_bf16(case, pipeline, reference, gates):
    """One transformer forward on fixed seeded inputs stays within the gate's relative error of bf16."""
    output = pipeline.denoiser_forward(pipeline.denoiser_inputs(case, seed=0)).float().cpu()

    expected = reference.transformer_output(output)

    gates.require("transformer_output_relative_error_vs_bf16", relative_error(output, expected))
