"""svdquant-ref's quantized transformer on disk, so a second run loads it instead of quantizing.

``<cache>/quantized/<key>/`` holds one safetensors file with every replaced layer's tensors
(``SVDQuantLinear``: smoothing factors, low-rank branch, packed residual and scales;
``Int4WeightOnlyLinear``: packed weights, scales, zero points) and a manifest, written last,
with each layer's shape and settings, the quantization facts and every file's size. The key is
made of everything that decides the result: the weights' identity, the SVDQuant config, the
calibration settings and the layer names. The directory is built under a temporary name and
renamed into place; on reuse it is verified like synthetic weights (``quantgate.integrity``)
and rebuilt when damaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantgate.atomic import atomic_directory
from quantgate.cache import mark_used
from quantgate.integrity import manifest_problem, write_manifest
from quantgate.quant.calibration import content_key
from quantgate.quant.svdquant import Int4WeightOnlyLinear, SVDQuantLinear

FORMAT = "quantgate-svdquant"
FORMAT_VERSION = 1
MANIFEST = "quantgate-svdquant.json"
TENSORS = "quantized.safetensors"
_SVDQ_BUFFERS = ("smooth", "lora_down", "lora_up", "qweight", "wscales", "wtscale", "bias")
_W4A16_BUFFERS = ("qweight", "scales", "zeros", "bias")


def checkpoint_key(identity: Mapping[str, Any], config: Mapping[str, Any], calibration: Mapping[str, Any],
                   layers: list[str]) -> str:
    """The cache key of a quantized transformer (see the module docstring)."""
    return content_key({"format": FORMAT, "version": FORMAT_VERSION, "identity": dict(identity),
                        "config": dict(config), "calibration": dict(calibration), "layers": sorted(layers)})


def _record(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, SVDQuantLinear):
        return {"kind": "w4a4", "in_features": module.in_features, "out_features": module.out_features,
                "rank": module.rank, "precision": module.precision, "group_size": module.group_size,
                "bias": module.bias is not None, "unsigned_input": module.unsigned_input,
                "act_tensor_scale": module.act_tensor_scale}
    return {"kind": "w4a16", "in_features": module.in_features, "out_features": module.out_features,
            "group_size": module.group_size, "bias": module.bias is not None}


def save(directory: Path, model: nn.Module, names: list[str], facts: Mapping[str, Any]) -> None:
    """Write the quantized layers ``names`` of ``model`` to ``directory`` atomically."""
    from safetensors.torch import save_file

    tensors, layers = {}, {}
    for name in names:
        module = model.get_submodule(name)
        layers[name] = _record(module)
        for buffer in _SVDQ_BUFFERS if isinstance(module, SVDQuantLinear) else _W4A16_BUFFERS:
            value = getattr(module, buffer, None)
            if value is not None:
                tensors[f"{name}.{buffer}"] = value.detach().to("cpu").contiguous()
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        write_manifest(tmp, MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, "layers": layers,
                                       "facts": dict(facts)})


def problem(directory: Path) -> str | None:
    """Why the checkpoint at ``directory`` cannot be loaded, or None."""
    return manifest_problem(directory, MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION})


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def load(directory: Path, model: nn.Module, device: torch.device | str) -> dict[str, Any]:
    """Put the checkpoint's layers into ``model`` (on ``device``); return the facts recorded with it."""
    import json

    from safetensors.torch import load_file

    document = json.loads((directory / MANIFEST).read_text())
    tensors = load_file(str(directory / TENSORS), device=str(device))
    for name, meta in document["layers"].items():
        model.get_submodule(name)  # the layer must exist: the key names the same layers
        if meta["kind"] == "w4a4":
            layer = SVDQuantLinear(meta["in_features"], meta["out_features"], meta["rank"], meta["precision"],
                                   meta["group_size"], meta["bias"], device="meta",
                                   unsigned_input=meta.get("unsigned_input", False),
                                   act_tensor_scale=meta.get("act_tensor_scale", False))
            buffers = _SVDQ_BUFFERS
        else:
            layer = Int4WeightOnlyLinear.empty(meta["in_features"], meta["out_features"], meta["group_size"],
                                               meta["bias"])
            buffers = _W4A16_BUFFERS
        for buffer in buffers:
            key = f"{name}.{buffer}"
            if key in tensors:
                setattr(layer, buffer, tensors.pop(key))
        _replace(model, name, layer)
    if tensors:
        raise ValueError(f"{directory / TENSORS} holds tensors its manifest does not name: {sorted(tensors)[:3]}")
    mark_used(directory)
    return document["facts"]
