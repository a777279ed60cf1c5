"""LoRA concatenated into SVDQuant's low-rank branch (quantgate.lora.native), on small layers."""

from pathlib import Path

import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin
from safetensors.torch import save_file
from torch import nn

from quantgate.lora import Adapters, LoraFile, LoraMismatch, LoraUnsupported, lora_unsupported_reason
from quantgate.lora.native import NativeLoras
from quantgate.quant.svdquant import Int4WeightOnlyLinear, SVDQuantLinear
from quantgate.schemes import get_scheme

IN, OUT, RANK, LORA_RANK = 64, 48, 4, 3
Q = "blocks.0.attn.to_q"  # an SVDQuantLinear
ADALN = "blocks.0.norm.linear"  # W4A16
FF = "blocks.0.ff"  # a bf16 nn.Linear
NORM = "blocks.0.ln"  # no linear at all


def _svdquant_layer(dtype: torch.dtype, seed: int = 0) -> SVDQuantLinear:
    g = torch.Generator().manual_seed(seed)
    layer = SVDQuantLinear(IN, OUT, RANK, "int4", 32, bias=True, dtype=dtype)
    with torch.no_grad():
        layer.smooth.copy_(torch.rand(IN, generator=g) * 3 + 0.25)  # far from 1: A must meet it
        layer.lora_down.copy_(torch.randn(RANK, IN, generator=g))
        layer.lora_up.copy_(torch.randn(OUT, RANK, generator=g) * 0.1)
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g, dtype=torch.uint8))
        layer.wscales.copy_(torch.rand(layer.wscales.shape, generator=g) * 0.01)
        layer.bias.copy_(torch.randn(OUT, generator=g))
    return layer


class _Block(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = _svdquant_layer(dtype)
        self.norm = nn.Module()
        self.norm.linear = Int4WeightOnlyLinear(nn.Linear(IN, OUT), group_size=32)
        self.ff = nn.Linear(IN, OUT, dtype=dtype)
        self.ln = nn.LayerNorm(IN)


class _Denoiser(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dtype)])


class _FluxPipe(FluxLoraLoaderMixin):
    """What NativeLoras needs of a pipeline: its class's lora_state_dict and the denoiser."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        torch.manual_seed(0)
        self.transformer = _Denoiser(dtype)


class _SD3Pipe(SD3LoraLoaderMixin, _FluxPipe):
    pass


def _pair(seed: int, out: int = OUT, inp: int = IN, rank: int = LORA_RANK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g) / inp ** 0.5, torch.randn(out, rank, generator=g)


def _write(path: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], extra=None) -> LoraFile:
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"transformer.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = b.contiguous()
    save_file({**tensors, **(extra or {})}, str(path))
    return LoraFile(path, "path", "peft", str(path))


def _x(seed: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(7, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def test_the_branch_adds_exactly_s_b_a_x():
    layer, (a, b), x = _svdquant_layer(torch.float32), _pair(1), _x()
    before = layer(x)

    layer.apply_loras([(a, 0.75 * b)])

    expected = before.double() + 0.75 * (x.double() @ a.double().T) @ b.double().T
    assert layer.rank == RANK + LORA_RANK
    assert _relative(layer(x), expected) < 1e-5


def test_the_residual_is_untouched_and_clearing_restores_the_very_branch():
    layer, x = _svdquant_layer(torch.bfloat16), _x(dtype=torch.bfloat16)
    residual = {k: getattr(layer, k).clone() for k in ("qweight", "wscales", "smooth", "bias")}
    down, up, before = layer.lora_down, layer.lora_up, layer(x)

    layer.apply_loras([_pair(1), _pair(2)])
    loaded = {k: torch.equal(getattr(layer, k), v) for k, v in residual.items()}
    changed = not torch.equal(layer(x), before)
    layer.apply_loras([])

    assert loaded == dict.fromkeys(residual, True)
    assert changed
    assert all(torch.equal(getattr(layer, k), v) for k, v in residual.items())
    assert layer.lora_down is down and layer.lora_up is up and layer.rank == RANK
    assert torch.equal(layer(x), before)


def test_two_pairs_compose_like_one_of_their_concatenated_ranks():
    (a1, b1), (a2, b2), x = _pair(1), _pair(2), _x()
    two, one = _svdquant_layer(torch.float32), _svdquant_layer(torch.float32)

    two.apply_loras([(a1, b1), (a2, 0.5 * b2)])
    one.apply_loras([(torch.cat([a1, 0.5 * a2]), torch.cat([b1, b2], dim=1))])

    assert _relative(two(x), one(x)) < 1e-6


@pytest.fixture
def pipe():
    return _FluxPipe()


@pytest.fixture
def loras(pipe, tmp_path):
    """Adapters on every kind of layer: the SVDQuant branch, the W4A16 and the bf16 linear."""
    return NativeLoras(pipe, "transformer", "svdquant-ref")


@torch.no_grad()
def _outputs(pipe, x):
    block = pipe.transformer.blocks[0]
    return {Q: block.attn.to_q(x), ADALN: block.norm.linear(x), FF: block.ff(x)}


def test_load_maps_every_pair_onto_its_layer_at_the_files_scale(pipe, loras, tmp_path):
    pairs = {name: _pair(i) for i, name in enumerate((Q, ADALN, FF))}
    lora = _write(tmp_path / "l.safetensors", pairs)
    x = _x()
    before = _outputs(pipe, x)
    qweight = pipe.transformer.blocks[0].attn.to_q.qweight.clone()

    loras.load(lora, "style", strength=2.0)
    after = _outputs(pipe, x)

    assert loras.wrapped_layers() == 3 and loras.adapter_names() == ["style"]
    for name, (a, b) in pairs.items():
        expected = before[name].double() + 2.0 * (x.double() @ a.double().T) @ b.double().T
        assert _relative(after[name], expected) < 2e-2, name  # side paths run in bf16
    assert torch.equal(pipe.transformer.blocks[0].attn.to_q.qweight, qweight)


def test_strengths_zero_and_unload_give_the_exact_outputs_back(pipe, loras, tmp_path):
    x = _x()
    base = _outputs(pipe, x)
    loras.load(_write(tmp_path / "a.safetensors", {Q: _pair(1), FF: _pair(2)}), "a", strength=1.0)
    loras.load(_write(tmp_path / "b.safetensors", {Q: _pair(3), ADALN: _pair(4)}), "b", strength=1.0)

    loras.set_strengths({"a": 0.0, "b": 0.0})
    at_zero = _outputs(pipe, x)
    loras.set_strengths({"a": 1.0, "b": 0.5})
    both = _outputs(pipe, x)
    loras.unload()
    after = _outputs(pipe, x)

    assert all(torch.equal(at_zero[k], base[k]) for k in base)
    assert all(not torch.equal(both[k], base[k]) for k in base)
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert loras.wrapped_layers() == 0 and loras.adapter_names() == []
    assert not any(m._forward_hooks for m in pipe.transformer.modules())


def test_set_strengths_activates_exactly_the_named_adapters(pipe, loras, tmp_path):
    x = _x()
    loras.load(_write(tmp_path / "a.safetensors", {Q: _pair(1)}), "a", strength=1.0)
    only_a = _outputs(pipe, x)[Q]
    loras.load(_write(tmp_path / "b.safetensors", {Q: _pair(2)}), "b", strength=1.0)
    only_b = _outputs(pipe, x)[Q]

    loras.set_strengths({"a": 1.0})

    assert torch.equal(_outputs(pipe, x)[Q], only_a)
    assert not torch.equal(only_b, only_a)
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        loras.set_strengths({"c": 1.0})
    with pytest.raises(ValueError, match="already in use"):
        loras.load(_write(tmp_path / "c.safetensors", {Q: _pair(3)}), "a")


def test_network_alphas_scale_the_pair_as_peft_does(pipe, loras, tmp_path):
    a, b = _pair(1)
    x = _x()
    base = _outputs(pipe, x)[Q]
    alpha = torch.tensor(float(LORA_RANK) / 2)  # alpha / rank = 0.5
    loras.load(_write(tmp_path / "l.safetensors", {Q: (a, b)}, {f"transformer.{Q}.alpha": alpha}), "l", 1.0)

    expected = base.double() + 0.5 * (x.double() @ a.double().T) @ b.double().T
    assert _relative(_outputs(pipe, x)[Q], expected) < 1e-5


def test_a_kohya_file_is_read_through_diffusers_conversion(tmp_path):
    pipe = _FluxPipe()
    block = pipe.transformer.blocks[0]
    # kohya's single_blocks.N.linear2 is diffusers' single_transformer_blocks.N.proj_out
    pipe.transformer.single_transformer_blocks = nn.ModuleList([nn.Module()])
    pipe.transformer.single_transformer_blocks[0].proj_out = block.attn.to_q
    a, b = _pair(1)
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_single_blocks_0_linear2.lora_down.weight": a.contiguous(),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": b.contiguous(),
               "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(float(LORA_RANK))}, str(path))
    x = _x()
    base = block.attn.to_q(x)

    NativeLoras(pipe, "transformer").load(LoraFile(path, "path", "kohya", str(path)), "k", 1.0)

    expected = base.double() + (x.double() @ a.double().T) @ b.double().T
    assert _relative(block.attn.to_q(x), expected) < 1e-5


def test_sd3_alpha_keys_are_ignored_as_diffusers_does(tmp_path):
    pipe = _SD3Pipe()
    layer = pipe.transformer.blocks[0].attn.to_q
    a, b = _pair(1)
    x = _x()
    base = layer(x)
    lora = _write(tmp_path / "l.safetensors", {Q: (a, b)}, {f"transformer.{Q}.alpha": torch.tensor(1.0)})

    NativeLoras(pipe, "transformer").load(lora, "l", 1.0)

    expected = base.double() + (x.double() @ a.double().T) @ b.double().T
    assert _relative(layer(x), expected) < 1e-5


@pytest.mark.parametrize(("pairs", "error", "message"), [
    ({"blocks.0.attn.to_zz": _pair(1)}, LoraMismatch, "not found in the base model"),
    ({Q: _pair(1, inp=IN + 1)}, LoraMismatch, "size mismatch at blocks.0.attn.to_q"),
    ({NORM: _pair(1, out=IN)}, LoraUnsupported, "a LayerNorm, which has no low-rank branch and is no linear"),
])
def test_a_lora_that_does_not_fit_is_refused_saying_where(pipe, loras, tmp_path, pairs, error, message):
    with pytest.raises(error, match=message):
        loras.load(_write(tmp_path / "l.safetensors", pairs), "l")
    assert loras.wrapped_layers() == 0


def test_a_file_without_denoiser_weights_is_a_mismatch(loras, tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 4), "text_encoder.x.lora_B.weight": torch.zeros(4, 2)},
              str(path))
    with pytest.raises(LoraMismatch, match="holds no weights for the transformer"):
        loras.load(LoraFile(path, "path", "peft", str(path)), "te")


def test_svdquant_ref_takes_loras_through_its_own_path_and_refuses_to_fuse(pipe, tmp_path):
    scheme = get_scheme("svdquant-ref")
    adapters = Adapters(pipe, "transformer", scheme, "flux-schnell")
    x = _x()
    base = _outputs(pipe, x)[Q]

    name = adapters.load(_write(tmp_path / "l.safetensors", {Q: _pair(1)}), "l", strength=1.0)
    with pytest.raises(LoraUnsupported, match="already fused into each layer's low-rank branch"):
        adapters.fuse()
    loaded = adapters.wrapped_layers()
    adapters.close()

    assert lora_unsupported_reason(scheme) is None
    assert name == "l" and loaded == 1 and not adapters.altered
    assert adapters.wrapped_layers() == 0
    assert torch.equal(_outputs(pipe, x)[Q], base)
