"""Sources resolve to diffusers directories; the hub source reads the HF cache offline only."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from quantgate.errors import SourceInvalid, SourceUnavailable, UnknownNameError
from quantgate.models import get_model
from quantgate.models.sources import SourceContext, choose_source, get_source, pipeline_dir_problems

REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, pipeline_dir: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy ``pipeline_dir`` into ``cache`` the way huggingface_hub stores a download:
    content-addressed blobs, a snapshot of relative symlinks, and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    for root, _, files in os.walk(pipeline_dir, followlinks=True):
        for name in files:
            source = Path(root) / name
            rel = source.relative_to(pipeline_dir)
            if str(rel) in skip or name.startswith("quantgate-"):
                continue
            data = source.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, tiny_flux_dir):
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "black-forest-labs/FLUX.1-schnell", tiny_flux_dir)
    return cache


def test_hub_source_resolves_a_cached_snapshot_and_it_loads(hub_cache, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = get_model("flux-schnell")
    ctx = SourceContext(cache_dir=tmp_path / "qg")
    assert get_source("hub").unavailable(spec, ctx) is None

    resolved = get_source("hub").resolve(spec, ctx, "cpu")

    assert resolved.kind == "hub" and resolved.path.name == REVISION
    assert resolved.detail == f"black-forest-labs/FLUX.1-schnell@{REVISION}"
    pipe = FluxPipeline.from_pretrained(resolved.path, local_files_only=True, dtype=torch.bfloat16)
    assert pipe.transformer.config.num_layers == 1


def test_hub_source_without_the_weights_names_repo_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SourceUnavailable) as info:
        get_source("hub").resolve(get_model("flux-schnell"), SourceContext(cache_dir=tmp_path), "cpu")
    message = str(info.value)
    assert "black-forest-labs/FLUX.1-schnell" in message and str(tmp_path / "empty") in message
    assert "never downloads" in message


def test_an_incomplete_snapshot_names_the_missing_file(tmp_path, tiny_flux_dir, monkeypatch):
    cache = tmp_path / "hub"
    weights = next((tiny_flux_dir / "transformer").glob("*.safetensors")).name
    lay_out_hub_cache(cache, "black-forest-labs/FLUX.1-schnell", tiny_flux_dir, skip=(f"transformer/{weights}",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    reason = get_source("hub").unavailable(get_model("flux-schnell"), SourceContext(cache_dir=tmp_path))
    assert "incomplete" in reason and "transformer" in reason and "safetensors" in reason


def _copy(tiny_flux_dir, tmp_path):
    target = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, target, symlinks=False)
    return target


def test_path_source_accepts_a_diffusers_directory(tmp_path, tiny_flux_dir):
    target = _copy(tiny_flux_dir, tmp_path)
    ctx = SourceContext(cache_dir=tmp_path, paths={"flux-schnell": target})
    resolved = get_source("path").resolve(get_model("flux-schnell"), ctx, "cpu")
    assert resolved.path == target.resolve() and resolved.kind == "path"


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda d: (d / "model_index.json").unlink(), "model_index.json is missing"),
    (lambda d: (d / "vae" / "config.json").unlink(), "vae/config.json is missing"),
    (lambda d: shutil.rmtree(d / "tokenizer_2"), "tokenizer_2 is missing"),
    (lambda d: [p.rename(p.with_suffix(".bin")) for p in (d / "transformer").glob("*.safetensors")],
     "only pickle weights"),
    (lambda d: (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"})),
     "names pipeline 'StableDiffusion3Pipeline'"),
])
def test_path_source_rejects_an_unusable_directory_naming_the_file(tmp_path, tiny_flux_dir, damage, expected):
    target = _copy(tiny_flux_dir, tmp_path)
    damage(target)
    ctx = SourceContext(cache_dir=tmp_path, paths={"flux-schnell": target})
    with pytest.raises(SourceInvalid, match=expected.replace("/", os.sep)):
        get_source("path").resolve(get_model("flux-schnell"), ctx, "cpu")


def test_path_source_without_a_directory_says_which_option_to_pass(tmp_path):
    with pytest.raises(SourceInvalid, match="--quantgate-path flux-dev=DIR"):
        get_source("path").resolve(get_model("flux-dev"), SourceContext(cache_dir=tmp_path), "cpu")


def test_sharded_weights_need_every_shard(tmp_path, tiny_flux_dir):
    target = _copy(tiny_flux_dir, tmp_path)
    (target / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    problems = pipeline_dir_problems(target, get_model("flux-schnell"))
    assert any("00001-of-00002.safetensors is missing" in p for p in problems)


def test_auto_prefers_the_hub_cache_on_a_gpu_and_tiny_on_cpu(hub_cache, tmp_path, monkeypatch):
    ctx = SourceContext(cache_dir=tmp_path)
    flux, sd3 = get_model("flux-schnell"), get_model("sd35-medium")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    assert choose_source("auto", flux, "cpu", ctx) == "tiny"
    assert choose_source("auto", flux, "cuda", ctx) == "hub"
    assert choose_source("auto", sd3, "cuda", ctx) == "synthetic"  # not in that cache
    assert choose_source("synthetic", flux, "cpu", ctx) == "synthetic"


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="auto, hub, path, synthetic, tiny"):
        get_source("s3")
