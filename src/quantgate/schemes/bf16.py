"""The unquantized baseline: weights and compute in bfloat16."""

from quantgate.schemes.base import Scheme

SCHEMES = [
    Scheme(
        name="bf16",
        summary="bfloat16 weights and activations: the reference every other scheme is compared with",
        backend="none",
    ),
]
