"""Quantize a denoiser's transformer-block linears to W4A8, by GPTQ or round-to-nearest, with caches.

The steps, each usable on its own (the ``quantgate gptq`` commands call them one by one):

1. ``calibrate``: run the pipeline on the calibration prompts and accumulate ``H = 2 X Xᵀ`` of
   every selected linear's inputs (streaming; see ``quantgate.quant.calibration``), cached on
   disk. Hessians live on the layers' device while they accumulate; when all of them would not
   fit the budget (FLUX.1's 38 single blocks alone hold 15360x15360 fp32 Hessians, 0.9 GB each),
   the layers are split into passes over the same prompts, each cached on its own (where the
   disk has room). ``quantize_denoiser`` quantizes each pass as soon as it is collected and
   drops its Hessians, so one pass is held at a time.
2. ``quantize_linears``: layers of the same shape are stacked (within a memory budget) and
   quantized together, so GPTQ's sequential column loop runs once per stack instead of once
   per layer; a tqdm bar counts layers.
3. ``quantize_denoiser``: both of the above behind a checkpoint cache,
   ``<cache>/quantized/<key>/`` (safetensors + JSON), keyed by the weights' identity, the
   method's settings, the calibration settings and the layer names: a second run loads the
   checkpoint instead of calibrating and quantizing again.

Which layers: every ``nn.Linear`` inside the repeated transformer blocks (``BLOCK_LINEARS``),
the per-image adaLN modulation linears included: they hold about a third of SD3.5 Medium's
weights (and 3.2B of FLUX.1's 11.9B), so leaving them in bf16 would cap the memory reduction
near 2x. They see one row per image, so they run the ``dequant`` path (see ``w4a8``).
The embedders and final layers outside the blocks (timestep/text embedders, context embedder,
``norm_out``, ``proj_out``) stay bf16: about 20M of SD3.5's 2.24B weights, and the first and
last layers are where low-bit error hurts most (GPTQ's own LLM experiments keep embeddings
and the head in full precision too).

Calibration statistics come from the unquantized model (every layer sees full-precision
inputs) rather than from re-running the pipeline after each block is quantized, as the
paper does for transformers layer after layer: replaying a sampler trajectory per block would
multiply the calibration cost by the number of blocks, and the statistics would then depend
on the quantization result, so they could not be cached independently of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantgate.atomic import atomic_directory
from quantgate.cache import mark_used
from quantgate.integrity import manifest_problem, write_manifest
from quantgate.quant.calibration import CalibrationSettings, Hessian, collect_cached, content_key, select_linears
from quantgate.quant.gptq import GPTQConfig, QuantizedWeight, gptq_quantize, rtn_quantize
from quantgate.quant.int4 import GroupSpec
from quantgate.quant.w4a8 import (
    FORMAT,
    FORMAT_VERSION,
    W4A8Linear,
    kernel_choice,
    load_layers,
    read_config,
    save_layers,
    set_submodule,
)
from quantgate.quant.w4a8_triton import unsupported_shape

# The repeated blocks of diffusers' MMDiT denoisers: SD3's transformer_blocks, FLUX.1's
# transformer_blocks and single_transformer_blocks.
BLOCK_LINEARS = r"(single_)?transformer_blocks\.\d+\..+"
MANIFEST = "quantgate-manifest.json"  # file sizes, written last: a checkpoint without it is rebuilt


@dataclass(frozen=True)
class W4A8Method:
    """How the 4-bit weights are chosen: ``gptq`` (calibrated) or ``rtn`` (round to nearest)."""

    name: str
    gptq: GPTQConfig = GPTQConfig()

    @property
    def spec(self) -> GroupSpec:
        return self.gptq.spec

    @property
    def calibrates(self) -> bool:
        return self.name == "gptq"

    def facts(self) -> dict[str, Any]:
        """The settings that decide the quantized weights (recorded and part of the cache key)."""
        if self.calibrates:
            return {"method": self.name, **self.gptq.as_dict()}
        return {"method": self.name, "spec": self.gptq.as_dict()["spec"]}


def layer_spec(spec: GroupSpec, in_features: int) -> GroupSpec:
    """``spec`` for a layer of ``in_features`` inputs: per-channel when the group size does not divide it."""
    if spec.group_size is not None and in_features % spec.group_size:
        return replace(spec, group_size=None)
    return spec


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def hessian_budget(device: torch.device, fraction: float = 0.3) -> int | None:
    """Bytes the calibration Hessians may take on ``device``: a fraction of free GPU memory (None: no limit).

    Under a third: when a pass ends, each accumulator's running sum and its scaled Hessian
    briefly coexist (twice the budget), and the pipeline's activations need room while it runs.
    """
    free = _free_bytes(device)
    return None if free is None else int(free * fraction)


def calibration_passes(layers: Mapping[str, nn.Linear], budget: int | None) -> list[dict[str, nn.Linear]]:
    """``layers`` split, in order, into passes whose fp32 Hessians fit ``budget`` bytes each."""
    if budget is None:
        return [dict(layers)]
    passes: list[dict[str, nn.Linear]] = [{}]
    used = 0
    for name, linear in layers.items():
        size = linear.in_features**2 * 4
        if passes[-1] and used + size > budget:
            passes.append({})
            used = 0
        passes[-1][name] = linear
        used += size
    return passes


def hessian_bytes(layers: Mapping[str, nn.Linear]) -> int:
    """Bytes of the fp32 Hessians of ``layers`` (``in_features²`` each)."""
    return sum(linear.in_features**2 * 4 for linear in layers.values())


def hessian_cache_refusal(layers: Mapping[str, nn.Linear], cache_dir: str | Path | None,
                          fraction: float = 0.25) -> str | None:
    """Why the Hessians of ``layers`` are not written under ``cache_dir`` (None: they are).

    FLUX.1's block linears hold about 75 GB of fp32 Hessians, more than a 64 GB runner disk: they
    are cached only when they take at most ``fraction`` of the disk's free space. The quantized
    checkpoint (a quarter of bf16) is cached either way, and it is what a second run reads.
    """
    if cache_dir is None:
        return None
    import shutil

    probe = Path(cache_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    need, free = hessian_bytes(layers), shutil.disk_usage(probe).free
    if need > fraction * free:
        return (f"Hessians not cached: {need / 1e9:.1f} GB would exceed {fraction:.0%} of the "
                f"{free / 1e9:.1f} GB free under {probe}")
    return None


def calibrate_passes(pipe: Any, denoiser: nn.Module, layers: Mapping[str, nn.Linear], settings: CalibrationSettings,
                     identity: Mapping[str, Any], cache_dir: str | Path | None, budget: int | None = None
                     ) -> Iterator[tuple[dict[str, nn.Linear], dict[str, torch.Tensor], dict[str, Any]]]:
    """Hessians ``2 X Xᵀ / n`` of ``layers``' inputs, one pass at a time: yields (the pass's layers,
    their Hessians, the pass's record), so a caller can use and drop each pass's Hessians before
    the next is collected. Each pass fits ``budget`` bytes and is cached on its own under
    ``<cache_dir>/calibration``.
    """
    passes = calibration_passes(layers, budget)
    for index, chunk in enumerate(passes):
        desc = "quantgate: GPTQ calibration" + (f" (pass {index + 1}/{len(passes)})" if len(passes) > 1 else "")
        stats, facts = collect_cached(pipe, denoiser, chunk,
                                      lambda _name, linear: Hessian(linear.in_features, device=linear.weight.device),
                                      "hessian", settings, identity, cache_dir, desc=desc)
        hessians = {name: stats[name]["hessian"] for name in chunk}
        del stats
        yield chunk, hessians, {k: facts[k] for k in ("key", "cache", "layers") if k in facts}
        del hessians  # not held by this frame while the next pass collects


def calibration_facts(settings: CalibrationSettings, records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """What a calibration records: samples, its passes, time and whether the cache served it."""
    return {"samples": settings.samples, "passes": records, "seconds": round(seconds, 3),
            "cache": "hit" if all(r["cache"] == "hit" for r in records) else
            ("off" if all(r["cache"] == "off" for r in records) else "miss")}


def calibrate(pipe: Any, denoiser: nn.Module, layers: Mapping[str, nn.Linear], settings: CalibrationSettings,
              identity: Mapping[str, Any], cache_dir: str | Path | None,
              budget: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every pass of :func:`calibrate_passes` at once: all the Hessians, and facts about the run.

    Holds them all; :func:`quantize_denoiser` quantizes pass by pass instead.
    """
    start = time.perf_counter()
    hessians: dict[str, torch.Tensor] = {}
    records = []
    for _chunk, chunk_hessians, record in calibrate_passes(pipe, denoiser, layers, settings, identity, cache_dir,
                                                           budget):
        hessians.update(chunk_hessians)
        records.append(record)
    return hessians, calibration_facts(settings, records, time.perf_counter() - start)


def _stack_bytes(out_features: int, in_features: int, calibrated: bool) -> int:
    # GPTQ holds about six (out, in) fp32 working copies and four (in, in) ones per layer.
    return 4 * (6 * out_features * in_features + (4 * in_features**2 if calibrated else 0))


def quantize_linears(layers: Mapping[str, nn.Linear], method: W4A8Method,
                     hessians: Mapping[str, torch.Tensor] | None = None, *, budget: int = 2**30,
                     progress: bool = True) -> dict[str, W4A8Linear]:
    """W4A8 layers for ``layers`` (each on its weight's device), by GPTQ with ``hessians`` or RTN.

    Layers of one shape are stacked up to ``budget`` bytes of working memory and quantized in
    one call. Returned in the order of ``layers``.
    """
    if method.calibrates and hessians is None:
        raise ValueError("GPTQ needs the layers' Hessians: run calibrate() first")
    shapes: dict[tuple, list[str]] = {}
    for name, linear in layers.items():
        key = (linear.out_features, linear.in_features, linear.weight.device)
        shapes.setdefault(key, []).append(name)
    done: dict[str, W4A8Linear] = {}
    with tqdm(total=len(layers), desc=f"quantgate: {method.name.upper()} W4A8", unit="layer",
              disable=not progress) as bar:
        for (out_features, in_features, device), names in shapes.items():
            spec = layer_spec(method.spec, in_features)
            per_stack = max(1, budget // _stack_bytes(out_features, in_features, method.calibrates))
            for start in range(0, len(names), per_stack):
                stack = names[start:start + per_stack]
                weights = torch.stack([layers[n].weight.detach().float() for n in stack])
                if method.calibrates:
                    h = torch.stack([hessians[n].to(device=device, dtype=torch.float32) for n in stack])
                    result = gptq_quantize(weights, h, replace(method.gptq, spec=spec))
                    del h
                else:
                    result = rtn_quantize(weights, spec)
                del weights
                for i, name in enumerate(stack):
                    done[name] = _layer(result, i, layers[name])
                bar.update(len(stack))
    return {name: done[name] for name in layers}


def _layer(result: QuantizedWeight, index: int, linear: nn.Linear) -> W4A8Linear:
    zero = None if result.zero is None else result.zero[index]
    return W4A8Linear.from_quantized(result.q[index], result.scale[index], zero,
                                     None if linear.bias is None else linear.bias.detach())


def quantized_key(identity: Mapping[str, Any], method: W4A8Method, settings: CalibrationSettings | None,
                  layers: list[str]) -> str:
    """The checkpoint cache key: weights identity, method settings, calibration settings, layer names."""
    facts = {"identity": dict(identity), "method": method.facts(), "format_version": FORMAT_VERSION,
             "calibration": settings.key_facts() if method.calibrates and settings is not None else None,
             "layers": sorted(layers)}
    return content_key(facts)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stack_budget(device: torch.device) -> int:
    free = _free_bytes(device)
    return min(4 * 2**30, free // 4) if free is not None else 2**30


def _quantize_pass_by_pass(pipe: Any, denoiser: nn.Module, layers: Mapping[str, nn.Linear], method: W4A8Method,
                           settings: CalibrationSettings | None, identity: Mapping[str, Any],
                           cache_dir: str | Path | None, device: torch.device, progress: bool
                           ) -> tuple[dict[str, W4A8Linear], dict[str, Any] | None, float]:
    """W4A8 layers for ``layers``, and the calibration facts and quantizing seconds.

    GPTQ quantizes each calibration pass's layers as soon as its Hessians are collected and drops
    them: at most one pass of Hessians (a third of free GPU memory) is held, instead of all of
    FLUX.1's 75 GB. The new layers are swapped in only at the end, so every pass calibrates the
    unquantized model (see the module docstring).
    """
    if not method.calibrates:
        start = time.perf_counter()
        quantized = quantize_linears(layers, method, budget=_stack_budget(device), progress=progress)
        _synchronize(device)
        return quantized, None, round(time.perf_counter() - start, 3)
    refusal = hessian_cache_refusal(layers, cache_dir)
    done: dict[str, W4A8Linear] = {}
    records: list[dict[str, Any]] = []
    calibrating = quantizing = 0.0
    start = time.perf_counter()
    held = 0
    for chunk, hessians, record in calibrate_passes(pipe, denoiser, layers, settings, identity,
                                                    None if refusal else cache_dir, budget=hessian_budget(device)):
        held = max(held, hessian_bytes(chunk))
        calibrating += time.perf_counter() - start
        start = time.perf_counter()
        done.update(quantize_linears(chunk, method, hessians, budget=_stack_budget(device), progress=progress))
        del hessians
        _synchronize(device)
        quantizing += time.perf_counter() - start
        records.append(record)
        start = time.perf_counter()
    calibration = calibration_facts(settings, records, calibrating)
    calibration["hessian_bytes_held_max"] = held
    if refusal:
        calibration["hessian_cache"] = refusal
    return {name: done[name] for name in layers}, calibration, round(quantizing, 3)


def quantize_denoiser(pipe: Any, denoiser_name: str, method: W4A8Method, *, identity: Mapping[str, Any],
                      cache_dir: str | Path | None, settings: CalibrationSettings | None,
                      pattern: str = BLOCK_LINEARS, per_image: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Replace the block linears of ``pipe.<denoiser_name>`` by W4A8 layers; return facts to record.

    Loads ``<cache_dir>/quantized/<key>`` when present; otherwise calibrates (GPTQ), quantizes
    and saves the checkpoint there. ``per_image`` (a regex) only labels the layers that will
    run the ``dequant`` path in the facts.
    """
    denoiser = getattr(pipe, denoiser_name)
    layers = select_linears(denoiser, pattern)
    if not layers:
        raise ValueError(f"no nn.Linear of {denoiser_name} matches {pattern!r}")
    if method.calibrates and settings is None:
        raise ValueError(f"GPTQ needs calibration settings (prompts, samples) to quantize {denoiser_name}")
    device = next(iter(layers.values())).weight.device
    key = quantized_key(identity, method, settings, list(layers))
    directory = Path(cache_dir) / "quantized" / key if cache_dir is not None else None
    facts: dict[str, Any] = {"method": method.facts(), "layers": len(layers), "pattern": pattern,
                             "checkpoint_key": key}
    damaged = manifest_problem(directory, MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION}) \
        if directory is not None and directory.exists() else None
    document = read_config(directory) if directory is not None and damaged is None else None
    if damaged:
        facts["checkpoint_damaged"] = damaged[:300]
    quantized = None
    if document is not None and set(document["layers"]) == set(layers):
        start = time.perf_counter()
        try:
            quantized, document = load_layers(directory, device)
        except Exception as exc:  # a damaged checkpoint is rebuilt, not trusted
            facts["checkpoint_damaged"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            _synchronize(device)
            mark_used(directory)
            facts.update(checkpoint="hit", checkpoint_path=str(directory),
                         checkpoint_load_seconds=round(time.perf_counter() - start, 3),
                         calibration=document.get("calibration"), quantize_seconds=document.get("quantize_seconds"))
    if quantized is None:
        quantized, calibration, seconds = _quantize_pass_by_pass(pipe, denoiser, layers, method, settings, identity,
                                                                 cache_dir, device, progress)
        facts.update(checkpoint="miss" if directory is not None else "off", calibration=calibration,
                     quantize_seconds=seconds)
        if directory is not None:
            with atomic_directory(directory) as tmp:
                save_layers(tmp, quantized, {"method": method.facts(), "identity": dict(identity),
                                             "calibration": calibration, "quantize_seconds": seconds})
                write_manifest(tmp, MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION})  # last: it vouches
            facts["checkpoint_path"] = str(directory)
    for name, layer in quantized.items():
        set_submodule(denoiser, name, layer)
    facts["paths"] = expected_paths(quantized, per_image)
    return facts


def expected_paths(layers: Mapping[str, W4A8Linear], per_image: str | None) -> dict[str, Any]:
    """Which forward path each group of layers takes on a GPU (see ``quantgate.quant.w4a8``)."""
    import re

    pattern = re.compile(per_image) if per_image else None
    one_row = [n for n in layers if pattern is not None and pattern.fullmatch(n)]
    grouped = [n for n, layer in layers.items() if layer.groups > 1 and n not in one_row]
    gemm = len(layers) - len(one_row) - len(grouped)
    return {
        "int8_gemm_on_cuda": gemm,
        "dequant_on_cuda_per_image": {"layers": len(one_row),
                                      "why": "one row per image; torch._int_mm needs more than 16 rows"},
        "dequant_on_cuda_grouped": {"layers": len(grouped),
                                    "why": "a scale per input group: one INT8 GEMM per group would cost more "
                                           "memory traffic than dequantizing the weight once"},
        "off_cuda": "simulated in float32 (the same W4A8 function)",
        "kernel": kernel_choice(),  # QUANTGATE_W4A8_KERNEL: with "triton", every layer whose shape the
        # kernels take runs them on CUDA sm_80+ instead of the paths above
        "triton_capable_shapes": sum(unsupported_shape(layer.in_features, layer.out_features, layer.groups) is None
                                     for layer in layers.values()),
    }
