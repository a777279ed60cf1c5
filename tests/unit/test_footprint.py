"""Footprint accounting against hand-computed byte counts."""

import json

import pytest
import torch

from quantgate.measure.footprint import dense_bytes, module_footprint, reference_bytes
from quantgate.models import get_model


def test_plain_linear_in_bf16():
    layer = torch.nn.Linear(4, 3, dtype=torch.bfloat16)
    # 4*3 weights + 3 biases, 2 bytes each
    assert module_footprint(layer).total_bytes == 30
    assert module_footprint(layer).by_dtype == {"bfloat16": 30}


def test_tied_weights_and_views_are_counted_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    assert module_footprint(model).total_bytes == 10 * 4 * 4  # one fp32 table

    base = torch.zeros(8, dtype=torch.float16)
    holder = torch.nn.Module()
    holder.register_buffer("a", base[:4])
    holder.register_buffer("b", base[4:])
    assert module_footprint(holder).total_bytes == 16  # one 8-element fp16 storage


def test_buffers_count():
    norm = torch.nn.BatchNorm1d(5)  # weight, bias, running mean/var (fp32) + num_batches_tracked (int64)
    assert module_footprint(norm).total_bytes == 4 * 5 * 4 + 8


def test_torchao_int8_weights_count_their_real_storage():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16))
    quantize_(layer, Int8WeightOnlyConfig())
    # 32x64 int8 weights + per-row fp32 scale + per-row int8 zero point
    assert module_footprint(layer).total_bytes == 32 * 64 + 32 * 4 + 32
    assert module_footprint(layer).by_dtype == {"int8": 32 * 64 + 32, "float32": 128}


def test_bitsandbytes_nf4_counts_packed_weights_and_quant_state():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the `gpu` extra) is not installed")
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=False)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=False)
    layer = layer.to("cpu")  # quantizes (bitsandbytes >= 0.45 has a CPU backend)
    assert layer.weight.dtype == torch.uint8
    # 8192 weights at 4 bits + one fp32 absmax per 64 weights + the 16-entry fp32 NF4 code table
    assert module_footprint(layer).total_bytes == 8192 // 2 + (8192 // 64) * 4 + 16 * 4


def test_meta_tensors_count_by_shape():
    with torch.device("meta"):
        layer = torch.nn.Linear(1000, 1000, dtype=torch.bfloat16)
    assert module_footprint(layer).total_bytes == (1000 * 1000 + 1000) * 2


def test_dense_bytes_keeps_integer_buffers_at_their_size():
    norm = torch.nn.BatchNorm1d(5)
    assert dense_bytes(norm, torch.bfloat16) == 4 * 5 * 2 + 8


def test_reference_bytes_equal_a_bf16_load_of_the_same_config(tiny_flux_dir):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer", dtype=torch.bfloat16)
    config = tiny_flux_dir / "transformer" / "config.json"
    assert reference_bytes(FluxTransformer2DModel, config) == module_footprint(model).total_bytes


def test_full_flux_transformer_is_22_15_gib_in_bf16(tmp_path):
    comp = get_model("flux-schnell").component("transformer")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(comp.config_for("full")))
    assert reference_bytes(comp.load_class(), config) / 2**30 == pytest.approx(22.15, abs=0.005)
