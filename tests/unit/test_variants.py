"""The compile variant: torch.compile of the repeated blocks gives the eager outputs."""

import pytest
import torch

from quantgate.errors import UnknownNameError
from quantgate.variants import compile_repeated_blocks, get_variant


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


@pytest.mark.parametrize("model", ["flux-schnell", "flux-dev"])
def test_transformer_scope_inputs_reuse_the_graphs_the_pipeline_compiled(model, tiny_cache):
    """The transformer-scope benchmark must time the blocks the pipeline compiled: inputs whose
    types or shapes differ from the pipeline's call would recompile every block (FLUX once got
    a second set of graphs from ``joint_attention_kwargs=None`` against the pipeline's ``{}``).
    SD3.5 is not checked this way: under CFG its pipeline runs the denoiser on twice the rows
    of the transformer-scope benchmark, a different shape by definition."""
    from torch._dynamo.utils import counters

    from quantgate.cases import Selection, make_case
    from quantgate.models import get_model
    from quantgate.models.sources import SourceContext
    from quantgate.pipeline import load_pipeline

    torch._dynamo.reset()
    case = make_case(get_model(model), "tiny", "bf16", "compile", 1, "cpu", Selection(models=[model], schemes=["bf16"]))
    loaded = load_pipeline(case, SourceContext(cache_dir=tiny_cache))
    loaded.generate(case, ["a red fox in the snow"], seed=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "the pipeline call compiled nothing: the test would prove nothing"

    loaded.denoiser_forward(loaded.denoiser_inputs(case, seed=0))

    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
