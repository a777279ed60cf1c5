"""The compile variant: torch.compile of the repeated blocks gives the eager outputs."""

import pytest
import torch

from quantgate.variants import compile_repeated_blocks, get_variant
from quantgate.errors import UnknownNameError


def test_compile_compiles_each_repeated_block_and_matches_eager(tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    from quantgate.models.families import DenoiserShape, get_family

    eager = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir / "transformer", dtype=torch.bfloat16)
    compiled = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir / "transformer", dtype=torch.bfloat16)
    notes = compile_repeated_blocks(compiled)
    assert notes["compiled_blocks"] == {"JointTransformerBlock": 2}
    inputs = get_family("sd3").denoiser_inputs(dict(eager.config), DenoiserShape(1, 64, 64, 8), "cpu",
                                               torch.bfloat16, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = eager(**inputs)[0].float(), compiled(**inputs)[0].float()
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


def test_a_model_without_blocks_cannot_be_compiled_regionally():
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_repeated_blocks(torch.nn.Linear(2, 2))


def test_variants_are_registered():
    assert get_variant("eager").apply(torch.nn.Linear(2, 2)) == {}
    with pytest.raises(UnknownNameError, match="compile, eager"):
        get_variant("jit")
