"""The model registry holds the real configurations of FLUX.1 and SD3.5 Medium."""

import json

import pytest
import torch

from quantgate.errors import ConfigFileError, UnknownNameError
from quantgate.models import get_model, model_names
from quantgate.models.registry import load_models


def _params_on_meta(model: str, component: str) -> int:
    comp = get_model(model).component(component)
    cls = comp.load_class()
    with torch.device("meta"):
        if comp.library == "diffusers":
            module = cls.from_config(comp.config_for("full"))
        else:
            module = cls(cls.config_class(**comp.config_for("full")))
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_the_three_models():
    assert model_names() == ["flux-dev", "flux-schnell", "sd35-medium"]


def test_unknown_model_lists_the_valid_names():
    message = "unknown model 'flux-pro'; valid models: flux-dev, flux-schnell, sd35-medium"
    with pytest.raises(UnknownNameError, match=message):
        get_model("flux-pro")


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev"])
def test_flux_architecture(name):
    spec = get_model(name)
    t = spec.component("transformer").config_for("full")
    assert (t["num_layers"], t["num_single_layers"]) == (19, 38)
    assert t["num_attention_heads"] * t["attention_head_dim"] == 3072
    assert t["num_attention_heads"] == 24
    assert t["guidance_embeds"] is (name == "flux-dev")
    assert spec.component("text_encoder").cls == "CLIPTextModel"
    assert spec.component("text_encoder").config_for("full")["hidden_size"] == 768
    assert spec.component("text_encoder_2").cls == "T5EncoderModel"
    assert spec.component("text_encoder_2").config_for("full")["d_model"] == 4096
    assert spec.component("vae").config_for("full")["latent_channels"] == 16
    assert spec.pipeline == "FluxPipeline"


def test_sd35_medium_architecture():
    spec = get_model("sd35-medium")
    t = spec.component("transformer").config_for("full")
    assert t["num_layers"] == 24
    assert t["dual_attention_layers"] == list(range(13))
    assert t["qk_norm"] == "rms_norm"
    encoders = [(c.name, c.cls, c.config_for("full").get("hidden_size", c.config_for("full").get("d_model")))
                for c in spec.components if c.name.startswith("text_encoder")]
    assert encoders == [("text_encoder", "CLIPTextModelWithProjection", 768),
                        ("text_encoder_2", "CLIPTextModelWithProjection", 1280),
                        ("text_encoder_3", "T5EncoderModel", 4096)]
    assert spec.pipeline == "StableDiffusion3Pipeline"


@pytest.mark.parametrize(("name", "steps", "guidance", "max_seq"), [
    ("flux-schnell", 4, 0.0, 256),
    ("flux-dev", 50, 3.5, 512),
    ("sd35-medium", 40, 4.5, 256),
])
def test_defaults_follow_the_model_cards(name, steps, guidance, max_seq):
    d = get_model(name).defaults
    assert (d["num_inference_steps"], d["guidance_scale"], d["max_sequence_length"]) == (steps, guidance, max_seq)
    assert (d["height"], d["width"]) == (1024, 1024)


@pytest.mark.parametrize(("model", "component", "billions"), [
    ("flux-schnell", "transformer", 11.90),  # "12B"; 11.84B of it in linear layers
    ("sd35-medium", "transformer", 2.24),  # "2.5B" counts the positional-embedding buffer too
    ("flux-schnell", "text_encoder_2", 4.76),  # T5-XXL encoder
    ("sd35-medium", "text_encoder_2", 0.69),  # OpenCLIP bigG text tower
    ("flux-schnell", "text_encoder", 0.12),  # CLIP-L text tower
])
def test_full_size_parameter_counts(model, component, billions):
    assert _params_on_meta(model, component) / 1e9 == pytest.approx(billions, abs=0.01)


def test_flux_adaln_modulation_holds_about_3_2b_parameters():
    comp = get_model("flux-schnell").component("transformer")
    with torch.device("meta"):
        module = comp.load_class().from_config(comp.config_for("full"))
    adaln = sum(p.numel() for name, p in module.named_parameters() if ".norm1.linear." in name or
                ".norm1_context.linear." in name or ".norm.linear." in name)
    assert adaln / 1e9 == pytest.approx(3.2, abs=0.1)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _minimal_model(name, **over):
    data = {"name": name, "family": "flux", "pipeline": "FluxPipeline", "hub_repo": "org/x", "denoiser": "transformer",
            "per_image_linears": "norm_out\\.linear",
            "defaults": {"num_inference_steps": 4},
            "components": {"transformer": {"library": "diffusers", "class": "FluxTransformer2DModel",
                                           "role": "model", "config": {}}}}
    data.update(over)
    return data


def test_a_new_model_is_one_new_file(tmp_path):
    _write(tmp_path / "m.json", _minimal_model("m"))
    models = load_models(tmp_path)
    assert list(models) == ["m"] and models["m"].denoiser == "transformer"


@pytest.mark.parametrize(("data", "message"), [
    (_minimal_model("m", colour="red"), "unknown keys \\['colour'\\]"),
    (_minimal_model("other"), "name must equal the file name 'm'"),
    (_minimal_model("m", components={"transformer": {"use": "nope"}}), "uses unknown shared component 'nope'"),
    (_minimal_model("m", components={"transformer": {"library": "diffusers", "class": "X", "role": "model"}}),
     "missing 'config'"),
    (_minimal_model("m", defaults={"stepz": 3}), "unknown defaults"),
    ({"name": "m", "extends": "m"}, "circular"),
])
def test_a_broken_model_file_names_the_file_and_the_problem(tmp_path, data, message):
    _write(tmp_path / "m.json", data)
    with pytest.raises(ConfigFileError, match=message) as info:
        load_models(tmp_path)
    assert str(tmp_path / "m.json") in str(info.value)
