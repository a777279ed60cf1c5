"""The pipeline cache holds one pipeline, reuses it per key, and drops it on release."""

import gc
import weakref

import pytest

from quantgate import pipeline as pipeline_module
from quantgate.cases import Selection, build_cases
from quantgate.errors import PipelineBuildError, SourceUnavailable
from quantgate.models import get_model
from quantgate.models.sources import ResolvedSource, SourceContext
from quantgate.pipeline import LoadedPipeline, PipelineCache
from quantgate.schemes import get_scheme


class Weights:
    """Stands in for a pipeline object; weak references tell whether anything still holds it."""


def _cases():
    return build_cases(Selection(models=["flux-schnell"], schemes=["bf16", "int8-wo"]), lambda s, d: "tiny",
                       tiers=("cpu",))


@pytest.fixture
def loads(monkeypatch):
    calls = []

    def fake_load(case, ctx, calibration=None, phases=None):
        calls.append(case.pipeline_key)
        spec = get_model(case.model)
        return LoadedPipeline(case.pipeline_key, spec, get_scheme(case.scheme),
                              ResolvedSource("tiny", ctx.cache_dir, "tiny", "fake"), case.device, Weights(), 0.0,
                              {}, 1)

    monkeypatch.setattr(pipeline_module, "load_pipeline", fake_load)
    return calls


def test_same_key_reuses_and_another_key_releases(tmp_path, loads):
    bf16, int8 = _cases()
    cache = PipelineCache(SourceContext(cache_dir=tmp_path))
    first = cache.get(bf16)
    held = weakref.ref(first.pipe)
    assert cache.get(bf16) is first and loads == [bf16.pipeline_key]

    cache.get(int8)
    gc.collect()
    assert loads == [bf16.pipeline_key, int8.pipeline_key]
    assert first.pipe is None and held() is None  # the old handle no longer holds its weights


def test_release_reports_nothing_on_cpu(tmp_path, loads):
    (bf16, _) = _cases()
    cache = PipelineCache(SourceContext(cache_dir=tmp_path))
    cache.get(bf16)
    released = cache.release()
    assert released.case_key == bf16.pipeline_key and released.leaked_bytes is None
    assert cache.release() is None


def test_a_failed_load_is_not_retried_and_keeps_its_message(tmp_path, monkeypatch):
    calls = []

    def failing_load(case, ctx, calibration=None, phases=None):
        calls.append(case)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(pipeline_module, "load_pipeline", failing_load)
    (bf16, _) = _cases()
    cache = PipelineCache(SourceContext(cache_dir=tmp_path))
    with pytest.raises(PipelineBuildError, match="flux-schnell-tiny-bf16-eager-b1-cpu: RuntimeError: CUDA out of memory"):
        cache.get(bf16)
    with pytest.raises(PipelineBuildError, match="already failed in this session: RuntimeError: CUDA out of memory"):
        cache.get(bf16)
    assert len(calls) == 1


def test_an_unavailable_source_is_rechecked_not_remembered(tmp_path, monkeypatch):
    calls = []

    def unavailable(case, ctx, calibration=None, phases=None):
        calls.append(case)
        raise SourceUnavailable("not cached")

    monkeypatch.setattr(pipeline_module, "load_pipeline", unavailable)
    (bf16, _) = _cases()
    cache = PipelineCache(SourceContext(cache_dir=tmp_path))
    for _ in range(2):
        with pytest.raises(SourceUnavailable):
            cache.get(bf16)
    assert len(calls) == 2


def test_a_real_tiny_pipeline_loads_with_its_scheme(tiny_cache):
    from torchao.quantization import Int8Tensor

    (_, int8) = _cases()
    cache = PipelineCache(SourceContext(cache_dir=tiny_cache))
    loaded = cache.get(int8)
    assert isinstance(loaded.denoiser.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert loaded.describe()["scheme_info"]["config"] == "TorchAoConfig(Int8WeightOnlyConfig())"
    ratio = loaded.denoiser_reference_bytes / loaded.denoiser_footprint.total_bytes
    assert 1.5 < ratio < 2.0
    images = loaded.generate(int8, ["a knitted owl"], seed=0)
    again = loaded.generate(int8, ["a knitted owl"], seed=0)
    assert images.shape == (1, 64, 64, 3) and (images == again).all()
    cache.release()
