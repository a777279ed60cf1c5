"""Model registry, weight sources and synthetic materialization."""

from quantgate.models.registry import SIZES, ComponentSpec, ModelSpec, Size, get_model, model_names

__all__ = ["SIZES", "ComponentSpec", "ModelSpec", "Size", "get_model", "model_names"]
