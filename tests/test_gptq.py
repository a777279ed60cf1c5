"""GPTQ W4A8's claims: better than round-to-nearest on the same grid, and a real INT8 GEMM where shapes allow.

Each W4A8 case computes its transformer-output error against bf16 on the fixed seeded inputs;
a GPTQ case divides its error by that of its round-to-nearest baseline (the scheme's
``rtn_baseline``, registered before it, so its pipeline runs first in the session). The W4A8
layers' forward paths are checked against what the load notes announce, and recorded.
"""

import re

import pytest

from quantgate.models import get_model
from quantgate.quality.metrics import relative_error
from quantgate.quant.w4a8 import W4A8Linear, path_counts
from quantgate.schemes import SCHEMES, get_scheme

pytestmark = [pytest.mark.quality, pytest.mark.per_pipeline]

RTN_BASELINES = {s.details["rtn_baseline"] for s in SCHEMES.values() if "rtn_baseline" in s.details}


def _key(case, scheme):
    return (case.device, case.model, case.source, case.batch, scheme, case.variant)


def test_gptq_error_is_below_round_to_nearest(case, records, gates, quantgate_run, request):
    """GPTQ's transformer-output error vs bf16 is at most the gate's fraction of RTN's on the same grid."""
    baseline = get_scheme(case.scheme).details.get("rtn_baseline")
    if baseline is None and case.scheme not in RTN_BASELINES | {"bf16"}:
        pytest.skip(f"{case.scheme} is neither a GPTQ scheme nor the round-to-nearest baseline of one")
    pipeline = request.getfixturevalue("pipeline")
    reference = request.getfixturevalue("reference")
    output = pipeline.denoiser_forward(pipeline.denoiser_inputs(case, seed=0)).float().cpu()

    error = relative_error(output, reference.transformer_output(output))  # the bf16 case records and skips here
    records.output_errors[_key(case, case.scheme)] = error
    if baseline is None:
        pytest.skip(f"{case.scheme} is the round-to-nearest baseline of this comparison (error {error:.4g} recorded)")
    rtn = records.output_errors.get(_key(case, baseline))
    if rtn is None:
        pytest.skip(f"no {baseline} transformer-output error for {case.model}/{case.source} at batch {case.batch} "
                    f"in this session (include {baseline} and bf16 in --quantgate-schemes)")

    gates.require("transformer_output_error_ratio_vs_rtn", error / rtn)


def test_w4a8_layers_take_the_paths_the_notes_announce(case, request):
    """One transformer forward: on a GPU every per-channel block linear with more than 16 rows runs the
    INT8 GEMM and the per-image and grouped ones dequantize; on the CPU every layer is simulated.

    What each layer did is written into the pipeline's notes, so the benchmark records that follow carry it.
    """
    if "gptq" not in get_scheme(case.scheme).markers:
        pytest.skip(f"{case.scheme} has no W4A8 layers")
    pipeline = request.getfixturevalue("pipeline")
    layers = {n: m for n, m in pipeline.denoiser.named_modules() if isinstance(m, W4A8Linear)}
    for layer in layers.values():
        layer.path_calls.clear()

    pipeline.denoiser_forward(pipeline.denoiser_inputs(case, seed=0))

    per_image = re.compile(get_model(case.model).per_image_linears)
    expected = {}
    for name, layer in layers.items():
        if case.device == "cpu":
            expected[name] = "simulated"
        else:
            expected[name] = "dequant" if per_image.fullmatch(name) or layer.groups > 1 else "int8_gemm"
    taken = {name: set(layer.path_calls) for name, layer in layers.items()}
    wrong = {name: sorted(paths) for name, paths in taken.items() if paths != {expected[name]}}
    counts = path_counts(pipeline.denoiser)
    pipeline.notes["w4a8_paths_observed"] = {"calls_per_forward": dict(counts), "layers": len(layers)}
    assert not wrong, (f"{case.id}: {len(wrong)} layers took another path than expected, e.g. "
                       + "; ".join(f"{n}: {p} instead of {expected[n]}" for n, p in list(wrong.items())[:5]))
