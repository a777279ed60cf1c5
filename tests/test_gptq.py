"""GPTQ's claim: its 4-bit weights reproduce the transformer better than round-to-nearest on the same grid.

Each W4A8 case computes its transformer-output error against bf16 on the fixed seeded inputs;
a GPTQ case divides its error by that of its round-to-nearest baseline (the scheme's
``rtn_baseline``, registered before it, so its pipeline runs first in the session).
"""

import pytest

from quantgate.quality.metrics import relative_error
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
