"""GPTQ W4A8's claims: better than round-to-nearest on the same grid, and a real INT8 GEMM where shapes allow.

Every case records its transformer-output error against bf16 on the fixed seeded inputs
(tests/test_quality.py); a GPTQ case divides its error by that of its round-to-nearest
baseline (the scheme's ``rtn_baseline``, registered before it, so its pipeline runs first in
the session). The W4A8 layers' forward paths are checked against what the load notes
announce, and recorded.
"""

import re

import pytest

from quantgate.applicability import scheme_detail, scheme_marked
from quantgate.models import get_model
from quantgate.quant.w4a8 import W4A8Linear, kernel_choice, path_counts
from quantgate.schemes import get_scheme

pytestmark = [pytest.mark.quality, pytest.mark.per_pipeline]


@pytest.mark.compares_cases  # reads the errors test_quality.py records for this case and its RTN baseline
@pytest.mark.applies.with_args(scheme_detail("rtn_baseline", "the scheme is no GPTQ scheme (it names no round-to-nearest "
                                                   "baseline)"))
def test_gptq_error_is_below_round_to_nearest(case, records, gates):
    """GPTQ's transformer-output error vs bf16 is at most the gate's fraction of RTN's on the same grid.

    Both errors come from tests/test_quality.py::test_transformer_output_matches_bf16 of this
    session, which runs for every case; the round-to-nearest scheme's pipeline runs before GPTQ's.
    """
    baseline = get_scheme(case.scheme).details["rtn_baseline"]
    key = (case.device, case.model, case.source, case.batch)
    own, rtn = records.output_errors.get((*key, case.scheme, case.variant)), records.output_errors.get(
        (*key, baseline, case.variant))
    if own is None or rtn is None:
        missing = case.scheme if own is None else baseline
        pytest.skip(f"no transformer-output error of {missing} for {case.model}/{case.source} at batch {case.batch} "
                    f"in this session: tests/test_quality.py::test_transformer_output_matches_bf16 must run for "
                    f"{case.scheme}, {baseline} and bf16")

    gates.require("transformer_output_error_ratio_vs_rtn", own / rtn)


@pytest.mark.applies.with_args(scheme_marked("gptq", "W4A8 layers"))
def test_w4a8_layers_take_the_paths_the_notes_announce(case, request):
    """One transformer forward: on a GPU every per-channel block linear with more than 16 rows runs the
    INT8 GEMM and the per-image and grouped ones dequantize (with QUANTGATE_W4A8_KERNEL=triton every
    layer the Triton kernels take runs them); on the CPU every layer is simulated.

    What each layer did is written into the pipeline's notes, so the benchmark records that follow carry it.
    """
    pipeline = request.getfixturevalue("pipeline")
    layers = {n: m for n, m in pipeline.denoiser.named_modules() if isinstance(m, W4A8Linear)}
    for layer in layers.values():
        layer.path_calls.clear()

    pipeline.denoiser_forward(pipeline.denoiser_inputs(case, seed=0))

    per_image = re.compile(get_model(case.model).per_image_linears)
    expected = {}
    for name, layer in layers.items():
        if kernel_choice() == "triton" and layer.triton_serves(case.device):
            expected[name] = "triton"  # QUANTGATE_W4A8_KERNEL=triton asked for quantgate's kernels
        elif case.device == "cpu":
            expected[name] = "simulated"
        else:
            expected[name] = "dequant" if per_image.fullmatch(name) or layer.groups > 1 else "int8_gemm"
    taken = {name: set(layer.path_calls) for name, layer in layers.items()}
    wrong = {name: sorted(paths) for name, paths in taken.items() if paths != {expected[name]}}
    counts = path_counts(pipeline.denoiser)
    pipeline.notes["w4a8_paths_observed"] = {"calls_per_forward": dict(counts), "layers": len(layers)}
    assert not wrong, (f"{case.id}: {len(wrong)} layers took another path than expected, e.g. "
                       + "; ".join(f"{n}: {p} instead of {expected[n]}" for n, p in list(wrong.items())[:5]))
