"""SVDQuant claims besides memory, speed and fidelity (which the shared gate tests check):

- what the low-rank branch costs: the transformer forward timed with the branch off, next to
  test_performance's timing with it on (unfused in svdquant-ref, fused in nunchaku's kernels);
- LoRA on nunchaku's 4-bit transformer without re-quantization: load, strength, reset, and
  composed LoRAs, through nunchaku's own API;
- LoRA on svdquant-ref without re-quantization: the LoRA goes into the low-rank branches and
  every 4-bit residual keeps its bytes (the LoRA gates themselves are tests/test_lora.py's).

Engine tests skip with the exact reason (no nunchaku, a GPU it has no kernels for such as
Hopper, no checkpoint in the cache).
"""

from __future__ import annotations

import gc

import pytest
import torch

from quantgate.applicability import scheme_marked, schemes
from quantgate.models import get_model
from quantgate.models.families import DenoiserShape, get_family
from quantgate.nunchaku_lora import LoraFile, apply_loras, plan_loras, reset_loras, set_strength, write_synthetic_lora
from quantgate.quant.lowrank import without_low_rank
from quantgate.quant.svdquant import SVDQuantLinear
from quantgate.schemes import nunchaku as nk


@pytest.mark.perf
@pytest.mark.mutates_pipeline
@pytest.mark.applies.with_args(scheme_marked("svdquant", "SVDQuant low-rank branch"))
def test_low_rank_branch_cost(case, request, records, gates):
    """The forward without the low-rank branch, timed; the branch's share of the time is recorded."""
    pipeline, bench = request.getfixturevalue("pipeline"), request.getfixturevalue("bench")
    inputs = pipeline.denoiser_inputs(case, seed=0)

    with without_low_rank(pipeline.denoiser) as layers:
        bench("transformer-no-low-rank", lambda: pipeline.denoiser_forward(inputs))

    bench.benchmark.extra_info["low_rank_layers"] = layers
    with_branch, without = records.get(case, "transformer"), records.get(case, "transformer-no-low-rank")
    if with_branch is None:
        pytest.skip(f"{case.id} has no transformer timing with the branch in this session: run "
                    "tests/test_performance.py::test_transformer_forward with it")
    gates.require("low_rank_branch_timing_overhead", with_branch.median_s / without.median_s - 1)


# -- LoRA through nunchaku --------------------------------------------------------------------

LORA_SCHEMES = ("svdq-int4", "svdq-nvfp4")  # nunchaku's LoRA API is on its V1 transformer class


def _forward(transformer, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**inputs)[0]


@pytest.mark.lora
@pytest.mark.per_pipeline
@pytest.mark.applies.with_args(schemes(*LORA_SCHEMES))
def test_lora_without_requantization(case, request, quantgate_run, tmp_path):
    """LoRAs load into the 4-bit model as they are: strength 0 and reset give the base model back,
    and composed LoRAs carry their own strengths (nunchaku's compose_lora)."""
    request.getfixturevalue("runs_here")  # skips with the hardware / engine reason
    found = nk.locate(get_model(case.model), case.scheme.removeprefix("svdq-"))
    if isinstance(found, str):
        pytest.skip(found)
    # The V2 pipeline of this case and a V1 transformer together would not fit a 24 GB card.
    quantgate_run.pipelines.release()
    transformer = nk.load_transformer(found, case.device, engine="v1")
    shape = DenoiserShape(batch=1, height=512, width=512, text_tokens=256)
    inputs = get_family("flux").denoiser_inputs(dict(transformer.config), shape, case.device, torch.bfloat16,
                                                torch.Generator().manual_seed(0))
    a = write_synthetic_lora(tmp_path / "a.safetensors", transformer.config, seed=0)
    b = write_synthetic_lora(tmp_path / "b.safetensors", transformer.config, seed=1)
    try:
        base = _forward(transformer, inputs)
        single = plan_loras([LoraFile(a, 1.0)])
        apply_loras(transformer, single)
        styled = _forward(transformer, inputs)
        set_strength(transformer, single, 0.0)
        at_zero = _forward(transformer, inputs)
        set_strength(transformer, single, 1.0)
        again = _forward(transformer, inputs)
        apply_loras(transformer, plan_loras([LoraFile(a, 1.0), LoraFile(b, 0.0)]))
        a_and_silent_b = _forward(transformer, inputs)
        apply_loras(transformer, plan_loras([LoraFile(a, 1.0), LoraFile(b, 1.0)]))
        both = _forward(transformer, inputs)
        reset_loras(transformer)
        after_reset = _forward(transformer, inputs)
    finally:
        del transformer
        gc.collect()
        torch.cuda.empty_cache()

    assert not torch.equal(styled, base), "loading the LoRA left the output unchanged"
    torch.testing.assert_close(at_zero, base)  # bf16 tolerances
    torch.testing.assert_close(again, styled)
    torch.testing.assert_close(a_and_silent_b, styled)
    assert not torch.equal(both, styled), "the second LoRA at strength 1 left the output unchanged"
    torch.testing.assert_close(after_reset, base)


_RESIDUAL = ("qweight", "wscales", "wtscale")  # what SVDQuant quantized: must never change for a LoRA


def _residuals(layers: dict[str, SVDQuantLinear]) -> dict[str, list[torch.Tensor]]:
    # Copies on the layer's device (about 6 GB for full-size FLUX.1: fine on the H200 runs).
    return {name: [getattr(m, k).clone() for k in _RESIDUAL if getattr(m, k) is not None]
            for name, m in layers.items()}


def _unchanged(layers: dict[str, SVDQuantLinear], saved: dict[str, list[torch.Tensor]]) -> list[str]:
    return [name for name, m in layers.items()
            if not all(torch.equal(getattr(m, k), v)
                       for k, v in zip([k for k in _RESIDUAL if getattr(m, k) is not None], saved[name],
                                       strict=True))]


@pytest.mark.lora
@pytest.mark.per_pipeline
@pytest.mark.applies.with_args(schemes("svdquant-ref"))
def test_a_lora_goes_into_the_branches_and_leaves_the_residuals_untouched(case, request):
    """svdquant-ref (SVDQuant section 4.4: a LoRA fuses into the low-rank branch): loading the
    model's synthetic LoRA grows exactly the branches of the layers it targets by its rank, the
    packed 4-bit residuals and their scales keep every byte through load, strengths and unload,
    and unload gives every layer its very branch back."""
    adapters, pipeline = request.getfixturevalue("lora_adapters"), request.getfixturevalue("pipeline")
    layers = {n: m for n, m in pipeline.denoiser.named_modules() if isinstance(m, SVDQuantLinear)}
    saved = _residuals(layers)
    branches = {n: (m.lora_down, m.lora_up, m.rank) for n, m in layers.items()}
    lora = adapters.synthetic(0)

    name = adapters.load(lora)
    grown = {n: m.rank - branches[n][2] for n, m in layers.items() if m.rank != branches[n][2]}
    after_load = _unchanged(layers, saved)
    adapters.set_strengths({name: 2.0})
    after_strength = _unchanged(layers, saved)
    adapters.unload()
    after_unload = _unchanged(layers, saved)
    restored = [n for n, m in layers.items() if (m.lora_down, m.lora_up, m.rank) != branches[n]]

    rank = lora.recipe["rank"]
    assert len(grown) == lora.recipe["layers"], (f"{case.id}: the LoRA targets {lora.recipe['layers']} layers, "
                                                 f"{len(grown)} SVDQuant branches took it")
    assert set(grown.values()) == {rank}, f"{case.id}: branches grew by {sorted(set(grown.values()))}, not {rank}"
    for when, changed in (("load", after_load), ("set_adapters", after_strength), ("unload", after_unload)):
        assert not changed, f"{case.id}: {len(changed)} 4-bit residuals changed at {when}, e.g. {changed[0]}"
    assert not restored, f"{case.id}: {len(restored)} branches not restored by unload, e.g. {restored[0]}"
