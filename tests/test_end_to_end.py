"""Prompt to image, end to end, for every case: the pipeline runs and produces real images.

Timed through pytest-benchmark (GPU synchronized, warm-up rounds); ``extra_info`` carries
the case, the footprint of every component and the peak memory of the run.
"""

import numpy as np
import pytest

pytestmark = [pytest.mark.perf, pytest.mark.memory]


def test_prompt_to_image(case, pipeline, bench, prompts):
    """The scheme's pipeline turns prompt strings into finite images of the requested size."""
    batch = prompts.take(case.batch)

    images = bench("end_to_end", lambda: pipeline.generate(case, batch, seed=0))

    assert images.shape == (case.batch, case.height, case.width, 3)
    bad = int(np.size(images) - np.isfinite(images).sum())
    assert bad == 0, f"{case.id}: {bad} of {images.size} pixel values are NaN or infinite"
    assert images.min() >= 0.0 and images.max() <= 1.0
