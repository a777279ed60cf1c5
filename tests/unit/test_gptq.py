"""GPTQ (quantgate.quant.gptq) against round-to-nearest and against the paper's math."""

import pytest
import torch

from quantgate.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_error,
    inverse_cholesky,
    prepare_hessian,
    rtn_quantize,
)
from quantgate.quant.int4 import GroupSpec, int_range


def _layer(seed: int, out_features: int = 24, in_features: int = 64, rows: int = 512):
    """A weight and correlated calibration inputs X (rows, in) with H = 2 XᵀX / rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(rows, in_features, generator=g) @ mix + 0.3 * torch.randn(rows, in_features, generator=g)
    x = x * torch.linspace(0.2, 3.0, in_features)  # uneven channel scales, as real activations have
    return w, x, 2 * x.t() @ x / rows


def _output_error(w, approx, x):
    return ((x @ (w - approx).t()).norm() / (x @ w.t()).norm()).item()


SPECS = [GroupSpec(4, None, False), GroupSpec(4, None, True), GroupSpec(4, 32, False), GroupSpec(3, 16, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.bits}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_calibration_outputs_better_than_round_to_nearest(spec, act_order):
    """||WX - QX|| on the calibration inputs is lower for GPTQ than for RTN on the same grid, seed after seed."""
    for seed in range(5):
        w, x, h = _layer(seed)
        gptq = gptq_quantize(w, h, GPTQConfig(spec=spec, act_order=act_order))
        rtn = rtn_quantize(w, spec)
        assert _output_error(w, gptq.dequantize(), x) < 0.95 * _output_error(w, rtn.dequantize(), x), f"seed {seed}"


def test_eight_bits_is_close_to_the_original():
    w, x, h = _layer(0)
    for symmetric in (True, False):
        result = gptq_quantize(w, h, GPTQConfig(spec=GroupSpec(8, None, symmetric)))
        assert _output_error(w, result.dequantize(), x) < 0.005
        low, high = int_range(8, symmetric)
        assert int(result.q.min()) >= low and int(result.q.max()) <= high  # 0..255 needs int16 storage
        if not symmetric:
            assert result.q.dtype == torch.int16 and int(result.q.max()) > 127


def test_the_shared_rtn_stores_eight_bit_asymmetric_values_without_wrapping():
    from quantgate.quant.int4 import dequantize_groups, quantize_rtn

    w, _, _ = _layer(1)
    q, scale, zero = quantize_rtn(w, GroupSpec(8, None, False))
    assert q.dtype == torch.int16 and int(q.max()) > 127  # the grid is 0..255
    assert ((dequantize_groups(q, scale, zero) - w).norm() / w.norm()).item() < 0.01


def _obq_reference(w: torch.Tensor, h: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """The textbook OBQ update, one row at a time in float64, columns left to right.

    Quantize column q, add ``-(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}`` to the row, then drop q
    from the inverse: ``H⁻¹ ← H⁻¹ - (H⁻¹)_{:,q} (H⁻¹)_{q,:} / [H⁻¹]_qq`` (Frantar & Alistarh 2022, eq. 2-3).
    """
    low, high = int_range(spec.bits, spec.symmetric)
    from quantgate.quant.int4 import group_params

    scale, zero = group_params(w, spec)  # per channel: fixed up front, as GPTQ does
    zero = torch.zeros_like(scale) if zero is None else zero
    out = torch.empty_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        row = w[r].double().clone()
        hinv = torch.linalg.inv(h.double())
        s, z = scale[r, 0].double(), zero[r, 0].double()
        for q in range(w.shape[1]):
            value = torch.clamp(torch.round(row[q] / s) + z, low, high)
            out[r, q] = value
            row -= (row[q] - (value - z) * s) / hinv[q, q] * hinv[:, q]
            hinv -= torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return out


def test_block_one_without_act_order_is_the_textbook_obq_update():
    w, _, h = _layer(3, out_features=6, in_features=16, rows=64)
    spec = GroupSpec(4, None, False)
    damped, _ = prepare_hessian(h[None], 0.01, torch.float64)
    result = gptq_quantize(w.double(), h.double(), GPTQConfig(spec=spec, block_size=1, act_order=False),
                           dtype=torch.float64)
    assert torch.equal(result.q.double(), _obq_reference(w, damped[0], spec))


@pytest.mark.parametrize("spec", [GroupSpec(4, None, False), GroupSpec(4, 16, True)], ids=["channel", "g16"])
def test_lazy_block_updates_give_the_same_result_as_column_updates(spec):
    w, _, h = _layer(4)
    results = [gptq_quantize(w, h, GPTQConfig(spec=spec, block_size=b, act_order=False), dtype=torch.float64)
               for b in (1, 7, 128)]
    for other in results[1:]:
        assert torch.equal(other.q, results[0].q)
        torch.testing.assert_close(other.scale, results[0].scale)


def test_a_stack_of_layers_equals_quantizing_each_alone():
    layers = [_layer(seed) for seed in range(3)]
    config = GPTQConfig(spec=GroupSpec(4, 32, False), act_order=True)
    stacked = gptq_quantize(torch.stack([w for w, _, _ in layers]), torch.stack([h for _, _, h in layers]), config,
                            dtype=torch.float64)
    for i, (w, _, h) in enumerate(layers):
        alone = gptq_quantize(w, h, config, dtype=torch.float64)
        assert torch.equal(stacked.q[i], alone.q)
        assert torch.equal(stacked.scale[i], alone.scale) and torch.equal(stacked.zero[i], alone.zero)


def test_the_loss_gptq_tracks_is_the_quadratic_error_under_the_damped_hessian():
    """Σ err² / 2 over the columns equals ½ tr(ΔW H ΔWᵀ): the objective GPTQ minimizes, measured exactly."""
    w, _, h = _layer(5)
    for act_order in (False, True):
        result = gptq_quantize(w, h, GPTQConfig(act_order=act_order), dtype=torch.float64)
        damped, _ = prepare_hessian(h[None], 0.01, torch.float64)
        expected = hessian_error(w, result.dequantize(), damped[0]) / 2
        torch.testing.assert_close(result.loss, expected, rtol=1e-6, atol=0)  # scales are fp32


def test_act_order_keeps_static_groups_contiguous():
    """With act-order the groups' parameters come from the unquantized weight, in the original column order."""
    w, _, h = _layer(6)
    spec = GroupSpec(4, 16, False)
    result = gptq_quantize(w, h, GPTQConfig(spec=spec, act_order=True))
    rtn = rtn_quantize(w, spec)
    assert torch.equal(result.scale, rtn.scale) and torch.equal(result.zero, rtn.zero)
    assert not torch.equal(result.q, rtn.q)  # the error feedback moved values


def test_dead_inputs_are_plainly_rounded_and_feed_nothing_forward():
    w, x, _ = _layer(7)
    x[:, 5] = 0  # input 5 never active during calibration
    h = 2 * x.t() @ x / x.shape[0]
    spec = GroupSpec(4, None, False)
    result = gptq_quantize(w, h, GPTQConfig(spec=spec, act_order=False))
    assert torch.equal(result.q[:, 5], rtn_quantize(w, spec).q[:, 5])


def test_rank_deficient_hessians_are_dampened_and_broken_ones_refused():
    w, x, _ = _layer(8, rows=8)  # 8 rows for 64 inputs: H has rank 8
    h = 2 * x.t() @ x / 8
    assert torch.isfinite(gptq_quantize(w, h).dequantize()).all()
    negative = -torch.eye(4)[None].double()
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        inverse_cholesky(negative, torch.tensor([-0.01], dtype=torch.float64))
