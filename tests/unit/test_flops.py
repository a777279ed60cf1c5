"""Analytic FLOPs of a denoiser forward, checked against the architecture's own arithmetic."""

import pytest
import torch

from quantgate.measure.flops import forward_flops
from quantgate.models import get_model
from quantgate.models.families import DenoiserShape, get_family


def flux_forward_flops(cfg: dict, image_tokens: int, text_tokens: int) -> int:
    """FLUX.1 forward, batch 1, written out from the architecture (2 FLOPs per multiply-add)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = image_tokens + text_tokens
    flops = 2 * image_tokens * cfg["in_channels"] * d + 2 * text_tokens * cfg["joint_attention_dim"] * d
    flops += 2 * (256 * d + d * d) + 2 * (cfg["pooled_projection_dim"] * d + d * d)  # timestep + pooled text
    if cfg["guidance_embeds"]:
        flops += 2 * (256 * d + d * d)
    per_stream = 2 * (3 * d * d + d * d + 4 * d * d + 4 * d * d)  # qkv, out, MLP up and down, per token
    double = (per_stream * (image_tokens + text_tokens)  # image and text streams, own weights
              + 2 * 2 * 6 * d * d  # adaLN modulation of both streams, one row each
              + 2 * 2 * n * n * d)  # QK^T and AV over the joint sequence
    single = (2 * n * (3 * d * d + 4 * d * d + 5 * d * d)  # qkv, MLP up, fused output projection
              + 2 * 3 * d * d + 2 * 2 * n * n * d)
    flops += cfg["num_layers"] * double + cfg["num_single_layers"] * single
    flops += 2 * 2 * d * d + 2 * image_tokens * d * cfg["in_channels"]  # norm_out modulation, proj_out
    return flops


@pytest.mark.parametrize("model", ["flux-schnell", "flux-dev"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_flux_flops_match_the_architecture(model, size):
    spec = get_model(model)
    comp = spec.component("transformer")
    config = comp.config_for(size)
    height = 1024 if size == "full" else 64
    shape = DenoiserShape(batch=1, height=height, width=height, text_tokens=256)
    expected = flux_forward_flops(config, (height // 16) ** 2, 256)
    assert forward_flops(comp.load_class(), config, get_family("flux"), shape) == expected


def test_full_flux_forward_is_about_70_tflop_at_1024px():
    comp = get_model("flux-schnell").component("transformer")
    flops = forward_flops(comp.load_class(), comp.config_for("full"), get_family("flux"),
                          DenoiserShape(1, 1024, 1024, 256))
    assert flops / 1e12 == pytest.approx(69.47, abs=0.01)


def test_flops_scale_linearly_with_batch():
    comp = get_model("sd35-medium").component("transformer")
    family = get_family("sd3")
    one = forward_flops(comp.load_class(), comp.config_for("tiny"), family, DenoiserShape(1, 64, 64, 16))
    four = forward_flops(comp.load_class(), comp.config_for("tiny"), family, DenoiserShape(4, 64, 64, 16))
    assert four == 4 * one


def test_sd3_pipelines_double_the_batch_under_cfg():
    family = get_family("sd3")
    assert family.rows_per_image(4.5) == 2 and family.rows_per_image(1.0) == 1
    assert get_family("flux").rows_per_image(3.5) == 1


@pytest.mark.parametrize(("model", "shapes"), [
    ("flux-schnell", {"hidden_states": (2, 16, 64), "encoder_hidden_states": (2, 8, 64), "img_ids": (16, 3)}),
    ("sd35-medium", {"hidden_states": (2, 16, 8, 8), "encoder_hidden_states": (2, 85, 64)}),
])
def test_denoiser_inputs_have_the_pipelines_shapes_and_are_seeded(model, shapes):
    spec = get_model(model)
    config = spec.component("transformer").config_for("tiny")
    family = get_family(spec.family)
    shape = DenoiserShape(batch=2, height=64, width=64, text_tokens=8)
    a = family.denoiser_inputs(config, shape, "cpu", torch.bfloat16, torch.Generator().manual_seed(0))
    b = family.denoiser_inputs(config, shape, "cpu", torch.bfloat16, torch.Generator().manual_seed(0))
    for name, expected in shapes.items():
        assert tuple(a[name].shape) == expected
    assert torch.equal(a["hidden_states"], b["hidden_states"])
    model_out = spec.component("transformer").load_class().from_config(config).to(torch.bfloat16)(**a)[0]
    assert model_out.shape[0] == 2
