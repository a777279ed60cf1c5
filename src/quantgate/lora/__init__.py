"""LoRA on quantized pipelines: LoRA files (a user's, from the hub cache, or synthetic) and
how they attach to a loaded pipeline through diffusers' public API."""

from quantgate.lora.adapters import Adapters, lora_unsupported_reason
from quantgate.lora.files import (
    LORA_WEIGHT_NAME,
    LoraFile,
    LoraMismatch,
    LoraUnsupported,
    UserLora,
    lora_format,
    parse_lora_option,
    resolve_user_lora,
)
from quantgate.lora.synthetic import DEFAULT_TARGETS, SyntheticLoraRecipe, combine_loras, make_synthetic_lora

__all__ = [
    "Adapters", "DEFAULT_TARGETS", "LORA_WEIGHT_NAME", "LoraFile", "LoraMismatch", "LoraUnsupported",
    "SyntheticLoraRecipe", "UserLora", "combine_loras", "lora_format", "lora_unsupported_reason",
    "make_synthetic_lora", "parse_lora_option", "resolve_user_lora",
]
