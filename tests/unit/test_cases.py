"""Cases: the matrix built from a selection, per tier."""

from quantgate.cases import Selection, build_cases
from quantgate.models import get_model


def _synthetic(spec, device):
    return "synthetic"


def test_each_tier_gets_every_combination_and_the_cpu_tier_is_tiny():
    cases = build_cases(Selection(models=["flux-schnell", "sd35-medium"], schemes=["bf16", "int8-wo"],
                                  batches=(1, 4)), _synthetic)
    assert len(cases) == 2 * 2 * 2 * 2
    assert {c.source for c in cases if c.device == "cpu"} == {"tiny"}
    assert {c.source for c in cases if c.device == "cuda"} == {"synthetic"}
    assert len({c.id for c in cases}) == len(cases)
    assert {c.tier for c in cases} == {"gpu", "cpu"}


def test_defaults_come_from_the_model_card_at_the_sources_size():
    gpu, cpu = build_cases(Selection(models=["flux-schnell"], schemes=["bf16"]), _synthetic)
    assert (gpu.num_inference_steps, gpu.guidance_scale, gpu.height, gpu.width, gpu.max_sequence_length) == (
        4, 0.0, 1024, 1024, 256)
    assert (cpu.height, cpu.width) == (get_model("flux-schnell").tiny_defaults["height"], 64)
    assert gpu.id == "flux-schnell-synthetic-bf16-eager-b1-cuda"


def test_user_overrides_win():
    (case,) = build_cases(Selection(models=["sd35-medium"], schemes=["bf16"], steps=2, resolution=(512, 768)),
                          _synthetic, tiers=("gpu",))
    assert (case.num_inference_steps, case.height, case.width) == (2, 512, 768)
    assert case.call_kwargs() == {"num_inference_steps": 2, "guidance_scale": 4.5, "height": 512, "width": 768,
                                  "max_sequence_length": 256}


def test_per_pipeline_tests_take_only_the_smallest_batch():
    cases = build_cases(Selection(models=["flux-dev"], schemes=["bf16"], batches=(4, 16)), _synthetic,
                        per_pipeline=True)
    assert [c.batch for c in cases] == [4, 4]


def test_cases_that_share_a_pipeline_share_a_key():
    a, b = build_cases(Selection(models=["flux-dev"], schemes=["bf16"], batches=(1, 8)), _synthetic, tiers=("gpu",))
    assert a.pipeline_key == b.pipeline_key == ("cuda", "flux-dev", "synthetic", "bf16", "eager")
    assert a.gate_attrs("hopper")["hardware"] == "hopper"
