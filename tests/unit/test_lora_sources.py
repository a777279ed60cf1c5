"""LoRA files: the synthetic maker, user files (path, hub cache, kohya layout), and refusals."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate.errors import SourceInvalid, SourceUnavailable
from quantgate.lora import (
    Adapters,
    LoraMismatch,
    LoraUnsupported,
    SyntheticLoraRecipe,
    UserLora,
    combine_loras,
    lora_format,
    lora_unsupported_reason,
    make_synthetic_lora,
    parse_lora_option,
    resolve_user_lora,
)
from quantgate.lora.synthetic import linear_weights
from quantgate.models import get_model
from quantgate.schemes import get_scheme
from quantgate.schemes.base import Scheme
from tests.unit.test_sources import lay_out_hub_cache

FLUX = get_model("flux-schnell")
RECIPE = SyntheticLoraRecipe(seed=3, rank=4, relative_norm=0.25)


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def adapters(flux_pipe):
    made = Adapters(flux_pipe, "transformer", get_scheme("bf16"), "flux-schnell")
    yield made
    made.close()


def _forward(pipe):
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 64), "encoder_hidden_states": torch.randn(1, 8, 64),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)}
    with torch.inference_mode():
        return pipe.transformer(**{k: v.to(torch.bfloat16) for k, v in inputs.items()}, return_dict=False)[0].float()


# -- the synthetic maker ---------------------------------------------------------------------


def test_a_synthetic_lora_is_a_diffusers_lora_file_with_the_recipes_scale(tmp_path, tiny_flux_dir):
    from diffusers import FluxPipeline

    lora = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)

    assert lora.path.parent.parent == tmp_path / "lora" and lora.path.parent.name.startswith("flux-schnell-")
    assert lora.format == lora_format(lora.path) == "peft" and lora.kind == "synthetic"
    state_dict = FluxPipeline.lora_state_dict(str(lora.path))
    state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in state_dict}
    assert modules and all(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in modules)
    assert not any("norm" in m for m in modules), "adaLN modulation linears are not LoRA targets"
    assert lora.recipe["layers"] == len(modules)
    from safetensors import safe_open

    weights = linear_weights(tiny_flux_dir / "transformer")
    for module in modules:
        a, b = (state_dict[f"transformer.{module}.lora_{x}.weight"].float() for x in "AB")
        assert a.shape[0] == b.shape[1] == RECIPE.rank
        with safe_open(str(weights[module][1]), framework="pt") as fh:
            w = fh.get_tensor(f"{module}.weight").float()
        ratio = float(torch.linalg.vector_norm(b @ a) / torch.linalg.vector_norm(w))
        assert ratio == pytest.approx(RECIPE.relative_norm, rel=0.02), module


def test_the_same_recipe_reuses_the_file_and_another_seed_makes_another(tmp_path, tiny_flux_dir):
    first = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)
    stamp = first.path.stat().st_mtime_ns

    again = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)
    other = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, SyntheticLoraRecipe(seed=4, rank=4, relative_norm=0.25))

    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert other.path != first.path
    a, b = load_file(str(first.path)), load_file(str(other.path))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_the_synthetic_lora_is_seeded_identically_in_another_cache(tmp_path, tiny_flux_dir):
    one = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path / "a", RECIPE)
    two = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path / "b", RECIPE)
    a, b = load_file(str(one.path)), load_file(str(two.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_lora_file_is_rebuilt(tmp_path, tiny_flux_dir):
    lora = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)
    good = lora.path.read_bytes()
    lora.path.write_bytes(good[: len(good) // 2])

    rebuilt = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)

    assert rebuilt.path.read_bytes() == good


def test_combining_concatenates_ranks_so_the_deltas_add(tmp_path, tiny_flux_dir):
    a = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)
    b = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, SyntheticLoraRecipe(seed=9, rank=4, relative_norm=0.25))

    ab = combine_loras(FLUX, [(a, 1.0), (b, 0.5)], tmp_path)

    ta, tb, tab = (load_file(str(x.path)) for x in (a, b, ab))
    assert tab.keys() == ta.keys()
    for key in (k for k in ta if k.endswith(".lora_A.weight")):
        up = key.replace("lora_A", "lora_B")
        assert tab[key].shape[0] == 2 * RECIPE.rank
        expected = ta[up].float() @ ta[key].float() + 0.5 * tb[up].float() @ tb[key].float()
        torch.testing.assert_close(tab[up].float() @ tab[key].float(), expected, rtol=1e-5, atol=1e-6)


# -- user files: path, hub cache, option --------------------------------------------------------


def test_the_option_takes_comma_separated_entries_bound_to_models_or_not():
    entries = parse_lora_option(["a.safetensors,flux-dev=hub:org/lora", "sd35-medium=/x/y"],
                                ["flux-dev", "flux-schnell", "sd35-medium"])
    assert entries == [UserLora("a.safetensors"), UserLora("hub:org/lora", "flux-dev"),
                       UserLora("/x/y", "sd35-medium")]
    assert [e.id for e in entries] == ["a", "lora", "y"]
    with pytest.raises(SourceInvalid, match="unknown model 'flux-pro'"):
        parse_lora_option(["flux-pro=a.safetensors"], ["flux-dev"])


def test_a_path_is_a_file_or_a_directory_holding_one(tmp_path, tiny_flux_dir):
    lora = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)
    from_file = resolve_user_lora(UserLora(str(lora.path)), tmp_path)
    from_dir = resolve_user_lora(UserLora(str(lora.path.parent), "flux-schnell"), tmp_path)
    assert from_file.path == from_dir.path == lora.path.resolve()
    assert (from_file.kind, from_file.format, from_dir.model) == ("path", "peft", "flux-schnell")

    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for name in ("one.safetensors", "two.safetensors"):
        (crowded / name).write_bytes(lora.path.read_bytes())
    with pytest.raises(SourceInvalid, match="several LoRA files .*one.safetensors, two.safetensors"):
        resolve_user_lora(UserLora(str(crowded)), tmp_path)
    with pytest.raises(SourceInvalid, match="no such file"):
        resolve_user_lora(UserLora(str(tmp_path / "absent.safetensors")), tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SourceInvalid, match="not a readable safetensors file"):
        resolve_user_lora(UserLora(str(tmp_path / "broken.safetensors")), tmp_path)


def test_a_hub_lora_is_read_from_the_cache_offline(tmp_path, tiny_flux_dir, monkeypatch):
    lora = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path / "qg", RECIPE)
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    (repo_dir / "style.safetensors").write_bytes(lora.path.read_bytes())
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "someone/style-lora", repo_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    named = resolve_user_lora(UserLora("hub:someone/style-lora/style.safetensors"), cache)
    single = resolve_user_lora(UserLora("hub:someone/style-lora"), cache)

    assert named.path == single.path and named.path.read_bytes() == lora.path.read_bytes()
    assert named.kind == "hub" and named.detail.startswith("someone/style-lora/style.safetensors@")
    with pytest.raises(SourceUnavailable, match="someone/absent .*never downloads"):
        resolve_user_lora(UserLora("hub:someone/absent"), cache)


# -- loading through diffusers ------------------------------------------------------------------


def _kohya_pair(tmp_path, transformer, rank=4, alpha=2.0):
    """The same LoRA in kohya's FLUX layout (sd-scripts names, alpha) and in diffusers' layout."""
    torch.manual_seed(1)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.transformer_blocks[0].ff.net[0].proj.out_features
    single_in = transformer.single_transformer_blocks[0].proj_out.in_features
    kohya, peft = {}, {}
    scale = alpha / rank  # kohya applies up @ down * alpha / rank
    simple = {"double_blocks_0_img_attn_proj": ("transformer_blocks.0.attn.to_out.0", hidden, hidden),
              "double_blocks_0_txt_attn_proj": ("transformer_blocks.0.attn.to_add_out", hidden, hidden),
              "double_blocks_0_img_mlp_0": ("transformer_blocks.0.ff.net.0.proj", hidden, mlp),
              "double_blocks_0_img_mlp_2": ("transformer_blocks.0.ff.net.2", mlp, hidden),
              "single_blocks_1_linear2": ("single_transformer_blocks.1.proj_out", single_in, hidden)}
    for name, (module, in_f, out_f) in simple.items():
        down, up = torch.randn(rank, in_f) / in_f ** 0.5, torch.randn(out_f, rank) / rank ** 0.5
        kohya.update({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                      f"lora_unet_{name}.alpha": torch.tensor(alpha)})
        peft.update({f"{module}.lora_A.weight": down * scale, f"{module}.lora_B.weight": up})
    down, up = torch.randn(rank, hidden) / hidden ** 0.5, torch.randn(3 * hidden, rank) / rank ** 0.5
    kohya.update({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                  "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)})
    for proj, part in zip(("to_q", "to_k", "to_v"), up.chunk(3), strict=True):
        peft.update({f"transformer_blocks.0.attn.{proj}.lora_A.weight": down * scale,
                     f"transformer_blocks.0.attn.{proj}.lora_B.weight": part.contiguous()})
    kohya_path = tmp_path / "kohya_style.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in kohya.items()}, str(kohya_path))
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(tmp_path / "peft", transformer_lora_layers=peft,
                                   weight_name="peft_style.safetensors")
    return kohya_path, tmp_path / "peft" / "peft_style.safetensors"


def test_a_kohya_lora_loads_like_its_diffusers_equivalent(tmp_path, flux_pipe, adapters):
    kohya_path, peft_path = _kohya_pair(tmp_path, flux_pipe.transformer)
    kohya = resolve_user_lora(UserLora(str(kohya_path)), tmp_path)
    peft = resolve_user_lora(UserLora(str(peft_path)), tmp_path)
    assert (kohya.format, peft.format) == ("kohya", "peft")
    base = _forward(flux_pipe)

    adapters.load(kohya, strength=1.0)
    wrapped = adapters.wrapped_layers()
    with_kohya = _forward(flux_pipe)
    adapters.unload()
    adapters.load(peft, strength=1.0)
    with_peft = _forward(flux_pipe)

    assert wrapped == 8  # five plain layers and q, k, v split from the fused qkv
    assert not torch.equal(with_kohya, base)
    torch.testing.assert_close(with_kohya, with_peft, rtol=0, atol=1e-2 * float(with_peft.abs().max()))


def test_unloading_leaves_no_layer_wrapped_and_the_output_as_before(tmp_path, tiny_flux_dir, flux_pipe, adapters):
    base = _forward(flux_pipe)
    adapters.load(make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE))
    assert adapters.wrapped_layers() > 0 and not torch.equal(_forward(flux_pipe), base)

    adapters.unload()

    assert adapters.wrapped_layers() == 0 and torch.equal(_forward(flux_pipe), base)
    assert not adapters.altered


class Wrapped(torch.nn.Module):
    """A layer of our own kind holding a linear (packed weights, say): no ``.weight`` of its own."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


class OwnLinear(torch.nn.Module):
    """A layer of our own kind with a ``.weight`` (as a quantized linear might): not an nn.Linear."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize(("layer", "reason"), [(Wrapped, "not plain linears"), (OwnLinear, "is not supported")])
def test_a_layer_type_peft_cannot_wrap_is_refused_with_the_reason(tmp_path, tiny_flux_dir, flux_pipe, layer, reason):
    block = flux_pipe.transformer.transformer_blocks[0]
    original = block.attn.to_q
    block.attn.to_q = layer(original)
    custom = Scheme(name="opaque", summary="custom linears", backend="test")
    made = Adapters(flux_pipe, "transformer", custom, "flux-schnell")
    try:
        with pytest.raises(LoraUnsupported, match=f"opaque: .*{reason}"):
            made.load(make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE))
        assert made.altered
    finally:
        made.close()
        block.attn.to_q = original
    assert made.wrapped_layers() == 0


def test_a_scheme_that_declares_no_lora_support_is_refused_before_loading(tmp_path, tiny_flux_dir, flux_pipe):
    declared = Scheme(name="packed", summary="x", backend="test", lora_unsupported="its kernels fuse the weights")
    assert lora_unsupported_reason(declared) == "packed cannot take a LoRA: its kernels fuse the weights"
    assert lora_unsupported_reason(get_scheme("bf16")) is None
    made = Adapters(flux_pipe, "transformer", declared, "flux-schnell")
    with pytest.raises(LoraUnsupported, match="its kernels fuse the weights"):
        made.load(make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE))
    assert made.wrapped_layers() == 0 and not made.altered


def test_a_lora_for_another_model_is_a_mismatch(tmp_path, flux_pipe, adapters):
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(tmp_path, weight_name="elsewhere.safetensors", transformer_lora_layers={
        "blocks.0.mlp.lora_A.weight": torch.randn(4, 32), "blocks.0.mlp.lora_B.weight": torch.randn(32, 4)})
    elsewhere = resolve_user_lora(UserLora(str(tmp_path / "elsewhere.safetensors")), tmp_path)

    with pytest.raises(LoraMismatch, match="does not fit flux-schnell's transformer"):
        adapters.load(elsewhere)


def test_the_manifest_records_the_recipe_and_the_weights(tmp_path, tiny_flux_dir):
    lora = make_synthetic_lora(FLUX, tiny_flux_dir, tmp_path, RECIPE)
    manifest = json.loads((lora.path.parent / "quantgate-lora.json").read_text())
    assert manifest["recipe"]["seed"] == 3 and manifest["recipe"]["rank"] == 4
    assert manifest["layers"] == lora.recipe["layers"]
    assert all(os.path.isabs(w["file"]) for w in manifest["weights"])
    lo, hi = manifest["relative_norm_achieved"]["min"], manifest["relative_norm_achieved"]["max"]
    assert 0.24 < lo <= hi < 0.26
