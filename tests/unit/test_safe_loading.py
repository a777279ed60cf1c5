"""Safe loading: no network during a run, safetensors only, torch.load weights-only."""

from __future__ import annotations

import os
import pickle
import shutil
import socket

import pytest
import torch

from quantgate.cases import Selection, make_case
from quantgate.models import get_model
from quantgate.models.sources import SourceContext
from quantgate.pipeline import load_pipeline
from tests.unit.test_sources import lay_out_hub_cache


@pytest.fixture
def no_network(monkeypatch):
    """Every way to open a connection fails loudly and is recorded."""
    attempts: list[str] = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'socket.connect' else args}")
            raise OSError(f"quantgate test: network access attempted ({what})")
        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    return attempts


def test_loading_with_the_hub_source_opens_no_socket(tmp_path, tiny_flux_dir, monkeypatch, no_network):
    spec = get_model("flux-schnell")
    cache = tmp_path / "hub"
    snapshot = lay_out_hub_cache(cache, spec.hub_repo, tiny_flux_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    case = make_case(spec, "hub", "bf16", "eager", 1, "cpu", Selection(models=[spec.name], schemes=["bf16"]))

    loaded = load_pipeline(case, SourceContext(cache_dir=tmp_path / "qg"))

    assert no_network == []
    assert loaded.source.kind == "hub" and loaded.source.path == snapshot
    assert loaded.pipe.transformer.config.num_layers == 1  # the tiny weights, from the snapshot


def test_the_run_is_offline_and_weights_only_from_start_to_end(pytester, monkeypatch):
    """The variables are set by the plugin for the whole session (every test sees them), and
    modules that copied huggingface_hub's offline flag at import are updated too."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(name, raising=False)
    check = """
import os

import diffusers.utils.hub_utils
import huggingface_hub.constants


def _offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert huggingface_hub.constants.is_offline_mode()
    assert diffusers.utils.hub_utils.HF_HUB_OFFLINE


def test_first():
    _offline()


def test_last():
    _offline()
"""
    pytester.makepyfile(check)
    # diffusers is imported before the plugin, as a conftest or another plugin might do
    result = pytester.runpytest_subprocess("-p", "diffusers", "-p", "quantgate.plugin", "-p", "no:cacheprovider",
                                           "--quantgate-gates", str(_repo() / "fixtures" / "gates"))
    result.assert_outcomes(passed=2)


def _repo():
    from tests.conftest import REPO

    return REPO


class Payload:
    """A pickled object that is not a tensor: unpickling it would run code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_torch_load_is_weights_only_even_when_a_caller_asks_otherwise(tmp_path):
    from quantgate.safe_loading import enforce_offline

    enforce_offline()  # what the plugin does at configure (already done for this session)
    path = tmp_path / "model.bin"
    with open(path, "wb") as fh:
        pickle.dump(Payload(), fh, protocol=2)  # torch.save's protocol
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=False)


def test_a_directory_with_pickle_weights_is_refused_not_unpickled(tmp_path, tiny_flux_dir, monkeypatch):
    """Even past quantgate's own check of the directory, the pipeline loads with
    use_safetensors=True: diffusers refuses the .bin file instead of unpickling it."""
    from safetensors.torch import load_file

    spec = get_model("flux-schnell")
    flux = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, flux)
    weights = next((flux / "vae").glob("*.safetensors"))
    torch.save(load_file(weights), flux / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    monkeypatch.setattr("quantgate.models.sources.pipeline_dir_problems", lambda directory, spec: [])
    loads: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(str(a[0])) or real_load(*a, **k))
    case = make_case(spec, "path", "bf16", "eager", 1, "cpu", Selection(models=[spec.name], schemes=["bf16"]))

    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        load_pipeline(case, SourceContext(cache_dir=tmp_path / "qg", paths={spec.name: flux}))
    assert loads == []
