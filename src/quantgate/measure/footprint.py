"""Static footprint: the bytes a model's parameters and buffers really occupy.

Quantized weights are counted by their real storage: torchao tensor subclasses are
flattened (``__tensor_flatten__``) into their inner tensors (int8/fp8 data, scales, zero
points), and a bitsandbytes ``Params4bit`` counts its packed uint8 data plus the tensors of
its ``quant_state`` (absmax, code, nested statistics). Storage shared between tensors (tied
weights, views) is counted once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """Bytes held by a module, in total and per storage dtype."""

    total_bytes: int
    by_dtype: dict[str, int] = field(default_factory=dict)
    tensors: int = 0

    @property
    def gib(self) -> float:
        return self.total_bytes / GIB

    def as_dict(self) -> dict:
        return {"bytes": self.total_bytes, "gib": round(self.gib, 4), "by_dtype": dict(self.by_dtype),
                "tensors": self.tensors}


def _quant_state_tensors(state: object) -> Iterator[torch.Tensor]:
    # bitsandbytes QuantState: absmax, code (the 4-bit value table), offset, and state2 (the
    # quantized statistics of double quantization), all plain attributes.
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested)


def storage_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors whose storage holds ``tensor``'s data."""
    if hasattr(tensor, "__tensor_flatten__"):  # torchao (and other) wrapper subclasses
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name, None)
            if isinstance(inner, torch.Tensor):
                yield from storage_tensors(inner)
        return
    yield tensor
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        yield from _quant_state_tensors(state)


def module_footprint(module: torch.nn.Module) -> Footprint:
    """Real bytes of ``module``'s parameters and buffers (shared storage counted once)."""
    seen: set[tuple[str, int]] = set()
    by_dtype: dict[str, int] = defaultdict(int)
    count = 0
    tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
    for top in tensors:
        for t in storage_tensors(top):
            if t.device.type == "meta":
                nbytes = t.numel() * t.element_size()
            else:
                storage = t.untyped_storage()
                key = (str(t.device), storage.data_ptr())
                if key in seen:
                    continue
                seen.add(key)
                nbytes = storage.nbytes()
            by_dtype[str(t.dtype).removeprefix("torch.")] += nbytes
            count += 1
    return Footprint(sum(by_dtype.values()), dict(by_dtype), count)


def dense_bytes(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes ``module`` would hold with every floating tensor stored as ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        total += t.numel() * (itemsize if t.is_floating_point() else t.element_size())
    return total


def meta_model(model_class: type, config: dict, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """An instance of ``model_class`` built from ``config`` on the meta device (no memory, no weights)."""
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    with torch.device("meta"):
        if hasattr(model_class, "from_config") and not hasattr(model_class, "config_class"):
            model = model_class.from_config(config)  # diffusers ModelMixin
        else:
            model = model_class(model_class.config_class(**config))  # transformers PreTrainedModel
    return model.to(dtype)


def reference_bytes(model_class: type, config_path: str | Path, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the unquantized model described by ``config_path`` at ``dtype``.

    The model is instantiated on the meta device, so this costs no memory and no weights:
    it is the denominator of every memory-reduction claim ("3.6x less than BF16").
    """
    return dense_bytes(meta_model(model_class, json.loads(Path(config_path).read_text()), dtype), dtype)
