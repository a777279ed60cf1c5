"""A cheap fingerprint of a loaded pipeline, to prove that a test left it as it found it.

Tests that share a loaded pipeline must not change what the next test measures. The
fingerprint is taken once at load and again after every test of the pipeline's group; a
difference names what changed, and the plugin fails that test and reloads the pipeline.

What it covers, for every ``nn.Module`` component (the scheduler and tokenizers are excluded:
every generation resets the scheduler's state):

- modules: each submodule's path and class (a LoRA wrapper, a replaced or widened layer);
- tensors: each parameter's and buffer's path, shape, dtype, device and storage (pointer and
  offset; for tensor subclasses such as torchao's, the storages of their inner tensors), so a
  re-created or re-quantized weight shows, but an in-place write of the same storage does not
  (tests that fuse into weights are marked ``alters_pipeline`` and get a fresh instance);
- hooks: forward, pre-forward and backward hooks per module, accelerate's ``_hf_hook`` and
  diffusers' hook registry (offloading, caches), and torch's global module hooks;
- peft: the adapters a component holds (``peft_config``) and diffusers' loaded-LoRA flag;
- compile state: which modules carry a ``torch.compile`` wrapper.

Reading it touches metadata only (no GPU work): a few milliseconds for FLUX.1's 1,500 tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Storage = Any  # (data_ptr, offset), a tuple of named inner storages, or None


@dataclass(frozen=True)
class Fingerprint:
    """The structure of a pipeline's modules at one moment (see the module docstring)."""

    modules: Mapping[str, str]  # "component.path" -> class name
    tensors: Mapping[str, tuple[tuple[int, ...], str, str, Storage]]  # path -> (shape, dtype, device, storage)
    hooks: Mapping[str, tuple[Any, ...]]  # module path -> its hooks (only modules that have any)
    adapters: Mapping[str, str]  # component -> its peft adapters, as text
    compiled: frozenset[str]  # modules wrapped by torch.compile
    global_hooks: tuple[int, ...]


def _storage(tensor: torch.Tensor) -> Storage:
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # torchao's subclasses keep their data in inner tensors
        return tuple((name, _storage(getattr(tensor, name))) for name in names)
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _hooks(module: nn.Module) -> tuple[Any, ...]:
    registry = getattr(module, "_diffusers_hook", None)
    diffusers_hooks = tuple(sorted(getattr(registry, "hooks", {}) or {})) if registry is not None else ()
    accelerate = getattr(module, "_hf_hook", None)
    return (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks),
            len(getattr(module, "_backward_pre_hooks", {})),
            type(accelerate).__name__ if accelerate is not None else None, diffusers_hooks)


_NO_HOOKS = (0, 0, 0, 0, None, ())


def _adapters(module: nn.Module) -> str:
    config = getattr(module, "peft_config", None) or {}
    loaded = bool(getattr(module, "_hf_peft_config_loaded", False))
    names = {name: type(value).__name__ for name, value in config.items()} if isinstance(config, Mapping) else config
    return f"{names}" + (" (diffusers: LoRA loaded)" if loaded else "")


def _global_hooks() -> tuple[int, ...]:
    from torch.nn.modules import module as module_state

    return tuple(len(getattr(module_state, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's ``nn.Module`` components by name (a bare module counts as one)."""
    if isinstance(pipe, nn.Module):
        return {"module": pipe}
    return {name: m for name, m in (getattr(pipe, "components", None) or {}).items() if isinstance(m, nn.Module)}


def take(pipe: Any) -> Fingerprint:
    """The fingerprint of ``pipe`` (a diffusers pipeline or a bare module) now."""
    modules: dict[str, str] = {}
    tensors: dict[str, tuple[tuple[int, ...], str, str, Storage]] = {}
    hooks: dict[str, tuple[Any, ...]] = {}
    adapters: dict[str, str] = {}
    compiled: set[str] = set()
    for component, root in components(pipe).items():
        adapters[component] = _adapters(root)
        for path, module in root.named_modules(remove_duplicate=False):
            name = f"{component}.{path}" if path else component
            modules[name] = type(module).__name__
            found = _hooks(module)
            if found != _NO_HOOKS:
                hooks[name] = found
            if getattr(module, "_compiled_call_impl", None) is not None:
                compiled.add(name)
            for kind in (module._parameters, module._buffers):
                for key, tensor in kind.items():
                    if tensor is not None:
                        tensors[f"{name}.{key}"] = (tuple(tensor.shape), str(tensor.dtype), str(tensor.device),
                                                    _storage(tensor))
    return Fingerprint(modules, tensors, hooks, adapters, frozenset(compiled), _global_hooks())


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _keyed(label: str, before: Mapping[str, Any], after: Mapping[str, Any], describe: Any) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    out = []
    if added:
        out.append(f"{len(added)} {label} added ({_some(added)})")
    if removed:
        out.append(f"{len(removed)} {label} removed ({_some(removed)})")
    if changed:
        out.append(f"{len(changed)} {label} changed ({_some([describe(k, before[k], after[k]) for k in changed])})")
    return out


def _tensor_change(name: str, before: tuple, after: tuple) -> str:
    fields = ("shape", "dtype", "device", "storage")
    what = [f"{field} {b} -> {a}" if field != "storage" else "storage (re-created or re-quantized)"
            for field, b, a in zip(fields, before, after, strict=True) if b != a]
    return f"{name}: {'; '.join(what)}"


def _hook_change(name: str, before: tuple, after: tuple) -> str:
    fields = ("forward hooks", "pre-forward hooks", "backward hooks", "backward pre-hooks", "accelerate hook",
              "diffusers hooks")
    return f"{name}: " + "; ".join(f"{field} {b} -> {a}" for field, b, a in zip(fields, before, after, strict=True)
                                   if b != a)


def differences(before: Fingerprint, after: Fingerprint) -> list[str]:
    """What changed from ``before`` to ``after``, one line per kind of change (empty: nothing)."""
    out = _keyed("modules", before.modules, after.modules, lambda k, b, a: f"{k}: {b} -> {a}")
    out += _keyed("tensors", before.tensors, after.tensors, _tensor_change)
    out += _keyed("modules' hooks", {k: before.hooks.get(k, _NO_HOOKS) for k in set(before.hooks) | set(after.hooks)},
                  {k: after.hooks.get(k, _NO_HOOKS) for k in set(before.hooks) | set(after.hooks)}, _hook_change)
    out += [f"peft adapters of {k}: {before.adapters.get(k)} -> {after.adapters.get(k)}"
            for k in sorted(set(before.adapters) | set(after.adapters)) if before.adapters.get(k) != after.adapters.get(k)]
    if before.compiled != after.compiled:
        gained, lost = sorted(after.compiled - before.compiled), sorted(before.compiled - after.compiled)
        out.append("torch.compile state: " + "; ".join(
            part for part in (gained and f"compiled now: {_some(gained)}", lost and f"no longer compiled: {_some(lost)}")
            if part))
    if before.global_hooks != after.global_hooks:
        out.append(f"torch's global module hooks (forward, pre-forward, backward, backward pre): "
                   f"{before.global_hooks} -> {after.global_hooks}")
    return out
