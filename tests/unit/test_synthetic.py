"""Synthetic weights: materialized once, shared, verified on reuse, rebuilt when damaged."""

import hashlib
import json
import os

import pytest
import torch

from quantgate.integrity import safetensors_problem
from quantgate.models import get_model, synthetic
from quantgate.models.synthetic import MANIFEST, materialize, recipes_for


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _transformer_weights(pipeline_dir):
    (weights,) = (pipeline_dir / "transformer").glob("*.safetensors")
    return weights


def test_a_tiny_pipeline_loads_through_from_pretrained_and_runs(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a knitted owl", num_inference_steps=2, guidance_scale=0.0, height=64, width=64,
               max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 512


def test_weights_are_stored_in_bf16_with_the_configured_shape(tiny_flux_dir):
    from safetensors import safe_open

    with safe_open(_transformer_weights(tiny_flux_dir), "pt") as fh:
        dtypes = {fh.get_slice(name).get_dtype() for name in fh.keys()}
        single_blocks = {name.split(".")[1] for name in fh.keys() if name.startswith("single_transformer_blocks.")}
    assert dtypes == {"BF16"}
    assert len(single_blocks) == get_model("flux-schnell").component("transformer").tiny["num_single_layers"]


def test_reuse_builds_nothing(tiny_cache, tiny_flux_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a verified cache entry was rebuilt")

    monkeypatch.setattr(synthetic, "_build_component", refuse)
    assert materialize(get_model("flux-schnell"), "tiny", tiny_cache, progress=False) == tiny_flux_dir


def test_flux_and_sd35_share_one_t5_encoder_on_disk(tiny_flux_dir, tiny_sd3_dir):
    assert (tiny_flux_dir / "text_encoder_2").resolve() == (tiny_sd3_dir / "text_encoder_3").resolve()
    assert (tiny_flux_dir / "vae").resolve() != (tiny_sd3_dir / "vae").resolve()  # scaling factors differ


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(tmp_path, tiny_flux_dir):
    spec = get_model("flux-schnell")
    again = materialize(spec, "tiny", tmp_path / "a", progress=False)
    other = materialize(spec, "tiny", tmp_path / "b", seed=1, progress=False)
    assert _sha(_transformer_weights(again)) == _sha(_transformer_weights(tiny_flux_dir))
    assert _sha(_transformer_weights(other)) != _sha(_transformer_weights(tiny_flux_dir))
    assert other.name != again.name


@pytest.fixture
def private_flux(tmp_path):
    return materialize(get_model("flux-schnell"), "tiny", tmp_path, progress=False)


def test_a_truncated_weight_file_is_detected_and_rebuilt(tmp_path, private_flux, caplog):
    weights = _transformer_weights(private_flux)
    good = _sha(weights)
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)

    rebuilt = materialize(get_model("flux-schnell"), "tiny", tmp_path, progress=False)

    assert rebuilt == private_flux and _sha(_transformer_weights(rebuilt)) == good
    assert "rebuilding synthetic" in caplog.text and "transformer" in caplog.text


@pytest.mark.parametrize("edit", ["dtype", "data"])
def test_an_edit_that_keeps_the_size_and_a_parsing_header_is_detected_and_rebuilt(tmp_path, private_flux, caplog,
                                                                                  edit):
    import json
    import struct

    weights = _transformer_weights(private_flux)
    good = _sha(weights)
    raw = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    if edit == "dtype":  # same length, still valid JSON and safetensors: BF16 read as F16
        header = raw[8:8 + header_len].decode()
        assert '"BF16"' in header
        raw[8:8 + header_len] = header.replace('"BF16"', '"F16" ', 1).encode()
        json.loads(raw[8:8 + header_len])
    else:  # flipped bytes at the start of the data (a sampled block)
        raw[8 + header_len:8 + header_len + 4] = bytes(b ^ 0xFF for b in raw[8 + header_len:8 + header_len + 4])
    weights.write_bytes(bytes(raw))

    rebuilt = materialize(get_model("flux-schnell"), "tiny", tmp_path, progress=False)

    assert _sha(_transformer_weights(rebuilt)) == good
    assert "changed since it was written" in caplog.text


def test_a_component_without_manifest_is_never_used(tmp_path, private_flux):
    component = (private_flux / "vae").resolve()
    (component / MANIFEST).unlink()
    materialize(get_model("flux-schnell"), "tiny", tmp_path, progress=False)
    assert (component / MANIFEST).is_file()


def test_a_crash_while_building_leaves_no_directory_that_looks_complete(tmp_path, monkeypatch):
    real = synthetic._build_component

    def crash_on_transformer(recipe, out, device):
        real(recipe, out, device)
        if recipe.component.name == "transformer":
            raise KeyboardInterrupt("simulated interrupt after the weights were written")

    monkeypatch.setattr(synthetic, "_build_component", crash_on_transformer)
    with pytest.raises(KeyboardInterrupt):
        materialize(get_model("flux-schnell"), "tiny", tmp_path, progress=False)

    root = synthetic.synthetic_root(tmp_path)
    recipe = recipes_for(get_model("flux-schnell"), "tiny", 0)["transformer"]
    assert not (root / "components" / recipe.dirname).exists()
    assert not (root / "pipelines").exists() or not any((root / "pipelines").iterdir())
    leftovers = [p.name for p in (root / "components").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_safetensors_problem_spots_truncation_and_padding(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64)}, path)
    assert safetensors_problem(path) is None
    size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\0")
    assert "padded" in safetensors_problem(path)
    with open(path, "r+b") as fh:
        fh.truncate(size - 10)
    assert "truncated" in safetensors_problem(path)
    path.write_bytes(b"\1\2")
    assert "no header" in safetensors_problem(path)


def test_manifest_records_recipe_and_files(private_flux):
    manifest = json.loads(((private_flux / "transformer").resolve() / MANIFEST).read_text())
    assert manifest["recipe"]["config"]["num_single_layers"] == 2
    assert manifest["recipe"]["seed"] == 0 and manifest["recipe"]["dtype"] == "bfloat16"
    assert any(name.endswith(".safetensors") for name in manifest["files"])
    assert os.readlink(private_flux / "transformer").startswith(os.path.join("..", "..", "components"))
