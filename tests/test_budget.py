"""Claims for a smaller card, checked on a big one: ``--quantgate-gpu-budget 16GiB``.

"FLUX runs under 16 GB" per scheme: with torch's allocator capped at the budget (an
allocation past it raises out-of-memory, as on the smaller card), the case runs prompt to
image and its peak (reserved by torch, loading included, plus memory held outside torch)
stays within the budget (gate ``gpu_budget_fraction_used`` with ``budget = "16GiB"``).
"""

import numpy as np
import pytest

from quantgate.budget import fraction_used, snapshot
from quantgate.measure.memory import synchronize

pytestmark = [pytest.mark.memory, pytest.mark.gpu_only]


def test_runs_within_gpu_budget(case, pipeline, prompts, gpu_budget, gates):
    """The case runs end to end within the session's GPU budget."""
    if gpu_budget.budget is None:
        pytest.skip("no GPU budget: pass --quantgate-gpu-budget 16GiB (or another size) to check a smaller "
                    "card's claims")
    if gpu_budget.cap is None and gpu_budget.not_enforced:
        pytest.skip(f"the GPU budget is not enforced in this session: {gpu_budget.not_enforced}")
    images = pipeline.generate(case, prompts.take(case.batch), seed=0)
    synchronize(case.device)
    assert np.isfinite(images).all(), f"{case.id}: non-finite pixels under the budget"
    peak = gpu_budget.sample(case)
    # Memory outside torch may have grown since the session started (kernels, library handles).
    outside = max(gpu_budget.cap.outside_torch, snapshot().outside_torch)
    gates.require("gpu_budget_fraction_used", fraction_used(peak, outside, gpu_budget.budget))
