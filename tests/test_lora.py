"""LoRA claims: a LoRA loads into every scheme's pipeline as it is (no re-quantization) and works.

Each test applies a LoRA through diffusers' public API (``load_lora_weights``,
``set_adapters``, ``fuse_lora``/``unfuse_lora``, ``unload_lora_weights``): the model's
synthetic LoRA (seeded, rank 16, attention and MLP linears of every block) and any
``--quantgate-lora`` file. "out" is one transformer forward on fixed seeded inputs; every
comparison is a relative error (quantgate.quality.metrics). A scheme that cannot take a
LoRA skips, saying why. A scheme with its own LoRA mechanism (``Scheme.lora_attach``:
svdquant-ref concatenates the LoRA into its low-rank branches) gets the same operations
from it; the fused tests are not generated for it (there is nothing to fuse), nor any LoRA
test for a scheme that declares it cannot take one (``quantgate.applicability``).
"""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from quantgate import applicability
from quantgate.quality.metrics import psnr, relative_error

pytestmark = [pytest.mark.lora, pytest.mark.applies.with_args(applicability.takes_a_lora)]

STRENGTHS = (0.5, 1.0, 2.0)  # each double the last: a linear response grows the effect 2x per step
COMPOSED = {"a": 1.0, "b": 0.5}  # 0.5 is a power of two: the combined reference holds it exactly


def _out(pipeline, inputs) -> torch.Tensor:
    return pipeline.denoiser_forward(inputs).float().cpu()


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 1.0 if numerator == 0 else math.inf


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denominator = (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).item()
    return float(torch.dot(a, b).item() / denominator) if denominator > 0 else 0.0


@pytest.mark.per_pipeline
def test_the_lora_moves_the_output_as_it_moves_bf16(case, lora_adapters, pipeline, lora, lora_reference, gates):
    """At strength 1 the LoRA moves the output by the gate's fraction and, on a quantized scheme,
    in the direction and by the amount it moves bf16 eager's (which records the reference); the
    error against bf16 with the same LoRA stays the scheme's own. The effect over the scheme's
    quantization noise is recorded too (gated on real weights only: on random ones NF4's noise is
    as large as the synthetic LoRA's effect, which says nothing about the LoRA)."""
    inputs = pipeline.denoiser_inputs(case, seed=0)
    base = _out(pipeline, inputs)
    lora_adapters.load(lora)
    with_lora = _out(pipeline, inputs)
    lora_reference.offer("base", base)
    lora_reference.offer("lora", with_lora)

    values = {"lora_effect_relative_change": relative_error(with_lora, base)}
    if not lora_reference.is_baseline:
        bf16_base, bf16_lora = lora_reference.require("base"), lora_reference.require("lora")
        effect, bf16_effect = with_lora - base, bf16_lora - bf16_base
        error, error_without = relative_error(with_lora, bf16_lora), relative_error(base, bf16_base)
        values.update({
            "lora_effect_cosine_vs_bf16": _cosine(effect, bf16_effect),
            "lora_effect_size_ratio_vs_bf16": _ratio(torch.linalg.vector_norm(effect.double()).item(),
                                                     torch.linalg.vector_norm(bf16_effect.double()).item()),
            "lora_output_relative_error_vs_bf16": error,
            "lora_error_growth_vs_no_lora": _ratio(error, error_without),
            "lora_effect_over_quantization_noise": _ratio(values["lora_effect_relative_change"], error_without),
        })
    gates.require_all(values)


@pytest.mark.per_pipeline
def test_an_image_with_the_lora_matches_bf16_with_it(case, lora_adapters, pipeline, lora, lora_reference, prompts,
                                                     gates):
    """Prompt to image with the LoRA (the first gate prompt, seed 0) against bf16's image with the
    same LoRA (PSNR); bf16 eager, which records that image, checks instead that the LoRA changes
    its image at all. One image: the transformer-output gates carry the numbers, this checks the
    LoRA survives the whole pipeline call."""
    without = pipeline.generate(case, prompts.take(1), seed=0) if lora_reference.is_baseline else None
    lora_adapters.load(lora)
    images = pipeline.generate(case, prompts.take(1), seed=0)
    lora_reference.offer("images", images)

    if without is not None:
        assert not np.array_equal(images, without), f"{case.id}: the LoRA left the bf16 image unchanged"
        gates.require("lora_image_psnr_db_vs_no_lora", psnr(images, without))
        return
    gates.require("lora_image_psnr_db_vs_bf16", psnr(images, lora_reference.require("images")))


@pytest.mark.per_pipeline
def test_strength_zero_is_no_lora_and_the_effect_grows_with_strength(case, lora_adapters, pipeline, lora, gates):
    """``set_adapters`` weight 0 gives the no-LoRA output; each doubling of the weight grows the effect."""
    inputs = pipeline.denoiser_inputs(case, seed=0)
    base = _out(pipeline, inputs)
    name = lora_adapters.load(lora, strength=0.0)
    at_zero = _out(pipeline, inputs)
    effects = []
    for strength in STRENGTHS:
        lora_adapters.set_strengths({name: strength})
        effects.append(relative_error(_out(pipeline, inputs), base))

    growth = min(_ratio(later, earlier) for earlier, later in pairwise(effects))

    gates.require_all({"lora_zero_strength_relative_change": relative_error(at_zero, base),
                       "lora_effect_growth_per_doubling": growth})


@pytest.mark.per_pipeline
def test_unloading_restores_the_output(case, lora_adapters, pipeline, lora, gates):
    """After ``unload_lora_weights`` no layer is wrapped and the output is the one before loading."""
    inputs = pipeline.denoiser_inputs(case, seed=0)
    base = _out(pipeline, inputs)
    lora_adapters.load(lora)
    assert lora_adapters.wrapped_layers > 0, f"{case.id}: load_lora_weights wrapped no layer of the denoiser"
    with_lora = _out(pipeline, inputs)

    lora_adapters.unload()

    assert lora_adapters.wrapped_layers == 0, f"{case.id}: {lora_adapters.wrapped_layers} layers still carry a LoRA"
    assert not torch.equal(with_lora, base), f"{case.id}: the LoRA changed nothing, so unloading proves nothing"
    gates.require("lora_unload_relative_change", relative_error(_out(pipeline, inputs), base))


@pytest.mark.per_pipeline
def test_two_loras_compose_like_one_of_their_concatenated_ranks(case, lora_adapters, pipeline, gates):
    """Two adapters at weights 1 and 0.5 equal one adapter holding both: at every wrapped layer
    W x + B_a A_a x + 0.5 B_b A_b x = W x + [B_a B_b][A_a; 0.5 A_b] x exactly, whatever the
    network does after it, so only rounding may separate them (a sum of the two LoRAs' separate
    output deltas would not be exact: the network is nonlinear)."""
    a, b = lora_adapters.synthetic(0), lora_adapters.synthetic(1)
    combined = lora_adapters.combined([(a, COMPOSED["a"]), (b, COMPOSED["b"])])
    inputs = pipeline.denoiser_inputs(case, seed=0)
    base = _out(pipeline, inputs)
    lora_adapters.load(a, "a")
    lora_adapters.load(b, "b")
    lora_adapters.set_strengths(COMPOSED)
    together = _out(pipeline, inputs)
    lora_adapters.unload()
    lora_adapters.load(combined, "ab")
    reference = _out(pipeline, inputs)

    error = float(torch.linalg.vector_norm((together - reference).double())
                  / torch.linalg.vector_norm((reference - base).double()))

    gates.require("lora_composition_relative_error", error)


@pytest.mark.per_pipeline
@pytest.mark.alters_pipeline
@pytest.mark.applies.with_args(applicability.fuses_a_lora)
def test_fused_lora_matches_unfused_and_unfuses(case, lora_adapters, pipeline, lora, gates):
    """``fuse_lora`` (which re-quantizes a quantized weight) gives the unfused output within the
    gate; ``unfuse_lora`` + unload come back to the original output within the gate."""
    inputs = pipeline.denoiser_inputs(case, seed=0)
    base = _out(pipeline, inputs)
    lora_adapters.load(lora)
    unfused = _out(pipeline, inputs)
    lora_adapters.fuse()
    fused = _out(pipeline, inputs)

    lora_adapters.unfuse()
    lora_adapters.unload()

    gates.require_all({"lora_fused_relative_error_vs_unfused": relative_error(fused, unfused),
                       "lora_fuse_round_trip_relative_change": relative_error(_out(pipeline, inputs), base)})


def _time_a_forward_with_the_lora(case, pipeline, bench, lora, scope: str) -> None:
    inputs = pipeline.denoiser_inputs(case, seed=0)
    out = bench(scope, lambda: pipeline.denoiser_forward(inputs), flops_scope="transformer")
    bench.benchmark.extra_info["lora"] = lora.describe()
    assert torch.isfinite(out).all(), f"{case.id}: the transformer output with the LoRA holds NaN or inf"


@pytest.mark.perf
def test_transformer_forward_with_a_lora(case, lora_adapters, pipeline, lora, bench):
    """One transformer forward with the LoRA loaded and unfused (peft's extra low-rank matmuls);
    FLOPs recorded are the base transformer's."""
    lora_adapters.load(lora)
    _time_a_forward_with_the_lora(case, pipeline, bench, lora, "transformer_lora")


# Its own function (not a parameter of the one above) so that a plan can select it by name: the
# fused weights outlive the test, so the pipeline is reloaded after it, a load a plan may not want
# to pay for on every scheme.
@pytest.mark.perf
@pytest.mark.alters_pipeline
@pytest.mark.applies.with_args(applicability.fuses_a_lora)
def test_transformer_forward_with_a_fused_lora(case, lora_adapters, pipeline, lora, bench):
    """One transformer forward with the LoRA fused into the weights (``fuse_lora``)."""
    lora_adapters.load(lora)
    lora_adapters.fuse()
    _time_a_forward_with_the_lora(case, pipeline, bench, lora, "transformer_lora_fused")


@pytest.mark.perf
@pytest.mark.per_pipeline
def test_lora_load_time(case, lora_adapters, pipeline, lora, benchmark, quantgate_run):
    """``load_lora_weights`` of the LoRA file into the loaded pipeline (unloaded before each round)."""
    from quantgate.measure.memory import synchronize

    def unload() -> None:
        if lora_adapters.wrapped_layers:
            lora_adapters.unload()

    def load() -> int:
        lora_adapters.load(lora)
        synchronize(case.device)
        return lora_adapters.wrapped_layers

    benchmark.group = f"{case.model}/{case.source}/lora_load/{case.device}"
    wrapped = benchmark.pedantic(load, setup=unload, rounds=quantgate_run.rounds,
                                 warmup_rounds=quantgate_run.warmup_rounds, iterations=1)

    benchmark.extra_info.update({"scope": "lora_load", **case.as_dict(), "lora": lora.describe(),
                                 "wrapped_layers": wrapped, "pipeline": pipeline.describe()})
    assert wrapped > 0, f"{case.id}: load_lora_weights wrapped no layer of the denoiser"


@pytest.mark.perf
@pytest.mark.gpu_only
@pytest.mark.after_timings
def test_lora_forward_overhead(runs_here, records, gates):
    """The forward with an unfused LoRA over the forward without, from this session's timings."""
    case = runs_here
    with_lora, without = records.get(case, "transformer_lora"), records.get(case, "transformer")
    if with_lora is None or without is None:
        missing = "test_transformer_forward_with_a_lora" if with_lora is None else \
            "tests/test_performance.py::test_transformer_forward"
        pytest.skip(f"{case.id}: no timing from {missing} in this session to compare with")

    gates.require("lora_forward_overhead", with_lora.median_s / without.median_s)
