"""Prompt to image, end to end, for every case: the pipeline runs and produces real images.

Timed through pytest-benchmark (GPU synchronized, warm-up rounds); ``extra_info`` carries
the case, the footprint of every component, the peak memory of the run and its FLOPs.
"""

import numpy as np
import pytest

from quantgate.applicability import not_the_baseline

pytestmark = [pytest.mark.perf, pytest.mark.memory]

# baseline scheme -> the suffix of its speedup metrics in fixtures/gates/
BASELINES = {"bf16": "bf16", "bnb-nf4": "nf4"}


@pytest.mark.times("end_to_end")
def test_prompt_to_image(case, pipeline, bench, prompts, gates):
    """The scheme's pipeline turns prompt strings into finite images of the requested size, and
    no timed round compiled."""
    batch = prompts.take(case.batch)

    images = bench("end_to_end", lambda: pipeline.generate(case, batch, seed=0))

    assert images.shape == (case.batch, case.height, case.width, 3)
    bad = int(np.size(images) - np.isfinite(images).sum())
    assert bad == 0, f"{case.id}: {bad} of {images.size} pixel values are NaN or infinite"
    assert images.min() >= 0.0 and images.max() <= 1.0
    gates.require("dynamo_compiles_in_timed_rounds", bench.compiles_in_timed_rounds)


@pytest.mark.gpu_only
@pytest.mark.applies.with_args(not_the_baseline())
@pytest.mark.compares_cases(timing="end_to_end")
@pytest.mark.parametrize("baseline", BASELINES)
def test_end_to_end_speedup(case, baseline, speedup, gates):
    """Prompt to image is at least x times faster than with the eager baseline."""
    gates.require(f"end_to_end_speedup_vs_{BASELINES[baseline]}", speedup("end_to_end", baseline))


@pytest.mark.gpu_only
def test_end_to_end_peak_memory(runs_here, records, gates):
    """The peak GPU memory of prompt to image stays within the card size the gate names."""
    measured = records.get(runs_here, "end_to_end")
    if measured is None or measured.peak_allocated_bytes is None:
        pytest.skip(f"{runs_here.id} has no end-to-end run with measured GPU memory in this session")
    gates.require("end_to_end_peak_allocated_bytes", measured.peak_allocated_bytes)
