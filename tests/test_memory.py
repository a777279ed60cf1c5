"""Memory claims of each scheme, gated by fixtures/gates/."""

import pytest

pytestmark = [pytest.mark.memory, pytest.mark.per_pipeline, pytest.mark.runs_first]


def test_transformer_footprint_reduction(case, pipeline, gates):
    """The scheme stores the transformer in at most 1/x of its bf16 bytes (x from fixtures/gates/)."""
    measured = pipeline.denoiser_footprint.total_bytes

    gates.require("transformer_footprint_reduction", pipeline.denoiser_reference_bytes / measured)
