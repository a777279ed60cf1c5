"""quantgate: gates for quantized FLUX.1 / Stable Diffusion 3.5 pipelines, as a pytest suite and plugin."""

__version__ = "0.1.0"
