"""Quality claims: each scheme's images and transformer output stay close to the bf16 reference.

Images are compared with the golden set of the model and source (golden_images/), else with
this session's bf16 eager images (bf16 eager itself with a rerun of its own); the transformer
output with bf16's on the same seeded inputs. With synthetic weights only the numerical gates
apply: the images are not meaningful, so LPIPS and CLIP score are not generated there.
"""

import pytest

from quantgate.applicability import real_weights
from quantgate.quality.metrics import psnr, relative_error, ssim

pytestmark = [pytest.mark.quality, pytest.mark.per_pipeline]


def test_images_match_the_reference(case, pipeline, reference, gates):
    """Each gate prompt, one image per seed, lands within the gate's PSNR and SSIM of the reference
    (bf16 eager without a golden set: its first image, of a rerun)."""
    images = reference.case_images()

    expected, _ = reference.images(images)

    images = images[:len(expected)]
    gates.require_all({"image_psnr_db_vs_reference": psnr(images, expected),
                       "image_ssim_vs_reference": ssim(images, expected)})


def test_transformer_output_matches_bf16(case, pipeline, reference, records, gates):
    """One transformer forward on fixed seeded inputs stays within the gate's relative error of bf16
    (bf16 eager itself: of a rerun, the reference must be reproducible)."""
    inputs = pipeline.denoiser_inputs(case, seed=0)
    output = pipeline.denoiser_forward(inputs).float().cpu()

    expected = reference.transformer_output(output, rerun=lambda: pipeline.denoiser_forward(inputs).float().cpu())

    error = relative_error(output, expected)
    records.output_errors[(case.device, case.model, case.source, case.batch, case.scheme, case.variant)] = error
    gates.require("transformer_output_relative_error_vs_bf16", error)


@pytest.mark.applies.with_args(real_weights)
def test_images_lpips_vs_reference(case, pipeline, reference, gates, quantgate_run):
    """Learned perceptual distance to the reference stays within the gate (real weights and a
    pretrained LPIPS backbone only; never a random network)."""
    from quantgate.quality.perceptual import lpips, lpips_problem

    net = quantgate_run.lpips_net
    if problem := lpips_problem(net):
        pytest.skip(problem)
    images = reference.case_images()
    expected, _ = reference.images(images)
    images = images[:len(expected)]

    gates.require("image_lpips_vs_reference", lpips(images, expected, net=net, device=case.device))


@pytest.mark.applies.with_args(real_weights)
def test_clip_score_vs_reference(case, pipeline, reference, gates, quantgate_run):
    """The images match their prompts (CLIP cosine) about as well as the reference images do
    (real weights and a pretrained CLIP only)."""
    from quantgate.quality.perceptual import clip_problem

    if problem := clip_problem(quantgate_run.clip_model):
        pytest.skip(problem)
    images = reference.case_images()
    expected, _ = reference.images(images)
    images = images[:len(expected)]
    scorer = quantgate_run.clip_scorer(case.device)
    prompts = [prompt for prompt, _ in reference.pairs][:len(expected)]
    score = scorer.mean(images, prompts)

    gates.require_all({"clip_score_cosine": score,
                       "clip_score_ratio_vs_reference": score / scorer.mean(expected, prompts)})
