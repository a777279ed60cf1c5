"""Quality claims: each scheme's images and transformer output stay close to the bf16 reference.

Images are compared with the golden set of the model and source (golden_images/), else with
this session's bf16 eager images; the transformer output with bf16's on the same seeded inputs.
With synthetic weights only these numerical gates apply: the images are not meaningful.
"""

import pytest

from quantgate.quality.metrics import psnr, relative_error, ssim

pytestmark = [pytest.mark.quality, pytest.mark.per_pipeline]


def test_images_match_the_reference(case, pipeline, reference, gates):
    """Each gate prompt, one image per seed, lands within the gate's PSNR and SSIM of the reference."""
    images = reference.case_images()

    expected, _ = reference.images(images)

    gates.require_all({"image_psnr_db_vs_reference": psnr(images, expected),
                       "image_ssim_vs_reference": ssim(images, expected)})


def test_transformer_output_matches_bf16(case, pipeline, reference, gates):
    """One transformer forward on fixed seeded inputs stays within the gate's relative error of bf16."""
    output = pipeline.denoiser_forward(pipeline.denoiser_inputs(case, seed=0)).float().cpu()

    expected = reference.transformer_output(output)

    gates.require("transformer_output_relative_error_vs_bf16", relative_error(output, expected))


def test_images_lpips_vs_reference(case, pipeline, reference, gates, quantgate_run):
    """Learned perceptual distance to the reference stays within the gate (real weights and a
    pretrained LPIPS backbone only; never a random network)."""
    from quantgate.quality.perceptual import lpips, lpips_problem

    reference.require_meaningful_images("LPIPS")
    net = quantgate_run.lpips_net
    if problem := lpips_problem(net):
        pytest.skip(problem)
    images = reference.case_images()
    expected, _ = reference.images(images)

    gates.require("image_lpips_vs_reference", lpips(images, expected, net=net, device=case.device))


def test_clip_score_vs_reference(case, pipeline, reference, gates, quantgate_run):
    """The images match their prompts (CLIP cosine) about as well as the reference images do
    (real weights and a pretrained CLIP only)."""
    from quantgate.quality.perceptual import clip_problem

    reference.require_meaningful_images("CLIP score")
    if problem := clip_problem(quantgate_run.clip_model):
        pytest.skip(problem)
    images = reference.case_images()
    expected, _ = reference.images(images)
    scorer = quantgate_run.clip_scorer(case.device)
    prompts = [prompt for prompt, _ in reference.pairs]
    score = scorer.mean(images, prompts)

    gates.require_all({"clip_score_cosine": score,
                       "clip_score_ratio_vs_reference": score / scorer.mean(expected, prompts)})
