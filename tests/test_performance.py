"""Speed claims: the transformer forward timed on its own, and speedups over bf16 and NF4.

Timings are benchmark figures (pytest-benchmark, GPU synchronized, warm-up first); speed is
gated only where fixtures/gates.toml names a gate, and only on GPUs.
"""

import statistics

import pytest
import torch

from quantgate.measure.timing import cuda_event_times

pytestmark = [pytest.mark.perf]

# baseline scheme -> the suffix of its speedup metrics in gates.toml
BASELINES = {"bf16": "bf16", "bnb-nf4": "nf4"}


def test_transformer_forward(case, pipeline, bench, gates):
    """One denoiser forward on fixed seeded inputs; FLOPs and achieved TFLOP/s are recorded, and
    no timed round compiled (a recompile would time the compiler, not the model)."""
    inputs = pipeline.denoiser_inputs(case, seed=0)

    out = bench("transformer", lambda: pipeline.denoiser_forward(inputs))

    assert torch.isfinite(out).all(), f"{case.id}: the transformer output holds NaN or inf"
    gates.require("dynamo_compiles_in_timed_rounds", bench.compiles_in_timed_rounds)


@pytest.mark.gpu_only
@pytest.mark.parametrize("baseline", BASELINES)
def test_transformer_speedup(case, baseline, speedup, gates):
    """The scheme's transformer forward is at least x times faster than the eager baseline's."""
    gates.require(f"transformer_speedup_vs_{BASELINES[baseline]}", speedup("transformer", baseline))


@pytest.mark.gpu_only
@pytest.mark.per_pipeline
def test_suite_timing_agrees_with_cuda_events(case, pipeline, records, gates, quantgate_run):
    """The suite's median of a transformer forward matches a bare CUDA-event loop over it."""
    suite = records.get(case, "transformer")
    if suite is None:
        pytest.skip(f"{case.id} has no transformer timing in this session to compare with")
    inputs = pipeline.denoiser_inputs(case, seed=0)

    events = statistics.median(cuda_event_times(lambda: pipeline.denoiser_forward(inputs), case.device,
                                                rounds=max(quantgate_run.rounds, 5), warmup_rounds=1))

    gates.require("timing_disagreement_vs_cuda_events", abs(suite.median_s - events) / events)
