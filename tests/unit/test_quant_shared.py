"""The shared pieces of quantgate's own quantizers: group quantization, INT4 packing, calibration."""

from __future__ import annotations

import pytest
import torch

from quantgate.quant.calibration import (
    CalibrationSettings,
    ChannelAbsMax,
    Hessian,
    StatsCache,
    calibration_key,
    select_linears,
)
from quantgate.quant.int4 import GroupSpec, dequantize_groups, pack_int4, quantize_rtn, unpack_int4


def test_int4_packing_round_trips_every_signed_value() -> None:
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32): every value, both nibbles
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_packing_round_trips_unsigned_values() -> None:
    q = torch.arange(0, 16, dtype=torch.int8).reshape(2, 8)
    assert torch.equal(unpack_int4(pack_int4(q), signed=False), q)


def test_int4_packing_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_int4(torch.tensor([[16, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_bounded_by_half_a_step(symmetric: bool) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    spec = GroupSpec(bits=4, group_size=32, symmetric=symmetric)
    q, scale, zero = quantize_rtn(w, spec)
    assert scale.shape == (16, 4)
    err = (dequantize_groups(q, scale, zero) - w).abs()
    step = scale.repeat_interleave(32, dim=1)
    assert torch.all(err <= step / 2 + 1e-6)


def test_more_bits_means_less_error() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    errors = [(dequantize_groups(*quantize_rtn(w, GroupSpec(bits=b, group_size=None))) - w).norm() for b in (3, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] / w.norm() < 0.01


def test_group_size_must_divide_the_row() -> None:
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        quantize_rtn(torch.randn(2, 100), GroupSpec(group_size=64))


def test_accumulators_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    h, m = Hessian(8), ChannelAbsMax(8)
    for x in batches:
        h.update(x)
        m.update(x)
    rows = torch.cat([x.reshape(-1, 8) for x in batches])
    assert h.rows == 30
    torch.testing.assert_close(h.hessian, 2 * rows.t() @ rows / 30)
    torch.testing.assert_close(m.absmax, rows.abs().amax(0))


def test_stats_cache_round_trips_and_keys_depend_on_settings(tmp_path) -> None:
    settings = CalibrationSettings(("a cat",), samples=2)
    key = calibration_key({"model": "x"}, settings, "hessian", ["b", "a"])
    assert key == calibration_key({"model": "x"}, settings, "hessian", ["a", "b"])
    assert key != calibration_key({"model": "x"}, CalibrationSettings(("a cat",), samples=3), "hessian", ["a", "b"])
    cache = StatsCache(tmp_path)
    assert cache.load(key) is None
    stats = {"blocks.0.ff": {"hessian": torch.eye(3), "rows": torch.tensor([4])}}
    cache.save(key, stats, {"kind": "hessian"})
    loaded = cache.load(key)
    assert loaded is not None and torch.equal(loaded["blocks.0.ff"]["hessian"], torch.eye(3))
    (tmp_path / f"{key}.safetensors").write_bytes(b"truncated")
    assert cache.load(key) is None


def test_select_linears_filters_by_name() -> None:
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "norm": torch.nn.ModuleDict({"linear": torch.nn.Linear(2, 2)}),
                                 "act": torch.nn.GELU()})
    assert set(select_linears(model)) == {"a", "norm.linear"}
    assert set(select_linears(model, exclude=r"norm\..*")) == {"a"}
    assert set(select_linears(model, pattern=r"norm\..*")) == {"norm.linear"}


def test_calibration_settings_pick_the_cpu_sample_count() -> None:
    settings = CalibrationSettings(("p",), samples=256, cpu_samples=4)
    assert settings.for_device("cpu", {"num_inference_steps": 2}).samples == 4
    cuda = settings.for_device("cuda", {"num_inference_steps": 2})
    assert cuda.samples == 256 and cuda.call_kwargs == {"num_inference_steps": 2}
    assert len(cuda.sample_prompts()) == 256
