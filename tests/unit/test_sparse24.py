"""2:4 sparse INT8 (quantgate's own): pruning, quantization and the layer's math."""

import pytest
import torch

from quantgate.quant.sparse24 import Sparse24Int8Linear, prune_2_4, quantize_rows, sparsify_linears


def test_pruning_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.125, 0.25, -0.375, 0.5]])
    assert prune_2_4(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -0.375, 0.5]]


def test_pruning_refuses_widths_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_2_4(torch.ones(2, 6))


def test_row_quantization_round_trips_within_half_a_step():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_the_layer_computes_the_pruned_linear_within_int8_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, dtype=torch.bfloat16)
    layer = Sparse24Int8Linear(linear)
    x = torch.randn(2, 7, 128, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), prune_2_4(linear.weight.float()), linear.bias.float())
    out = layer(x)
    assert out.shape == (2, 7, 64) and out.dtype == torch.bfloat16
    assert ((out.float() - exact).norm() / exact.norm()).item() < 0.02


def test_sparsify_swaps_eligible_linears_and_skips_by_name():
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(64, 64))
    model.add_module("norm_out", torch.nn.Sequential())
    model.norm_out.add_module("linear", torch.nn.Linear(64, 128))
    model.add_module("odd", torch.nn.Linear(48, 64))  # not a multiple of 32: left dense
    replaced = sparsify_linears(model, skip=r"norm_out\.linear")
    assert replaced == ["a"]
    assert isinstance(model.a, Sparse24Int8Linear) and isinstance(model.norm_out.linear, torch.nn.Linear)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.backends.cusparselt.is_available(),
                    reason="compares the cuSPARSELt kernel with the dense reference: needs a CUDA GPU with cuSPARSELt")
def test_cusparselt_kernel_matches_the_dense_reference():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, dtype=torch.bfloat16, device="cuda")
    layer = Sparse24Int8Linear(linear)
    x = torch.randn(3, 50, 256, dtype=torch.bfloat16, device="cuda")
    q_weight, _ = quantize_rows(prune_2_4(linear.weight.detach()))
    expected = layer.reference(x, q_weight)
    out = layer(x)
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 0.01
    assert layer.packed.numel() * layer.packed.element_size() < 256 * 128  # compressed below dense int8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.backends.cusparselt.is_available(),
                    reason="runs two chained cuSPARSELt layers: needs a CUDA GPU with cuSPARSELt")
def test_chained_sparse_layers_accept_column_major_inputs():
    # An MLP's second layer sees the first one's output; inside FLUX a column-major activation
    # made the kernel fail with "operation not supported" (fixed by passing row-major rows).
    torch.manual_seed(0)
    first = Sparse24Int8Linear(torch.nn.Linear(256, 512, dtype=torch.bfloat16, device="cuda"))
    second = Sparse24Int8Linear(torch.nn.Linear(512, 128, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(2, 64, 256, dtype=torch.bfloat16, device="cuda")
    hidden = torch.nn.functional.gelu(first(x))
    column_major = hidden.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = second(column_major)
    assert out.is_contiguous()
    # The row-major input's result is checked against the dense reference by the test above.
    torch.testing.assert_close(out, second(hidden.contiguous()))


def test_the_reference_path_accepts_column_major_inputs():
    torch.manual_seed(0)
    layer = Sparse24Int8Linear(torch.nn.Linear(64, 32, dtype=torch.bfloat16))
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x.t().contiguous().t()), layer(x))
