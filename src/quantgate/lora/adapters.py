"""LoRA on a loaded pipeline, through the API a diffusers user calls.

``Adapters`` loads files with ``pipe.load_lora_weights``, sets strengths with
``set_adapters``, fuses with ``fuse_lora``/``unfuse_lora`` and removes everything with
``unload_lora_weights``; peft wraps the denoiser's layers (``nn.Linear``, bitsandbytes and
torchao layers alike). A scheme that cannot take a LoRA says so, either up front
(``Scheme.lora_unsupported``) or because peft refuses its layer type: both become
``LoraUnsupported`` with the reason, which the tests turn into a skip. A scheme with its own
LoRA mechanism (``Scheme.lora_attach``, e.g. SVDQuant's low-rank branch) gets every operation
done by it instead of diffusers/peft.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from quantgate.lora.files import LoraFile, LoraMismatch, LoraUnsupported

# peft's refusal of a layer type it has no LoRA layer for ("Target module ... is not supported").
_PEFT_UNSUPPORTED = "is not supported"
# Names that match no module (peft's NoMatchingPeftModuleError), and shapes that do not fit
# (torch's load_state_dict) mean the file is for another model or size.
_MISMATCH = ("not found in the base model", "size mismatch", "incompatible shape")


def lora_unsupported_reason(scheme: Any) -> str | None:
    """Why ``scheme`` cannot take a LoRA before anything is loaded, or None."""
    declared = getattr(scheme, "lora_unsupported", None)
    if declared:
        return f"{scheme.name} cannot take a LoRA: {declared}"
    if getattr(scheme, "lora_attach", None) is not None:
        return None  # its own mechanism: no peft needed
    if importlib.util.find_spec("peft") is None:
        return "LoRA loading in diffusers needs peft, which is not installed: pip install peft"
    return None


def _tuner_layers(module: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class Adapters:
    """The LoRAs of one pipeline's denoiser; ``close`` leaves the pipeline without any.

    ``altered`` records whether the denoiser's own weights may have changed: fusing into
    quantized weights re-quantizes them, and a failed load can leave layers replaced (diffusers
    widens FLUX linears for LoRAs with larger inputs before it fails on the shapes). After
    ``close`` such a pipeline may differ from a fresh load of the same case.
    """

    def __init__(self, pipe: Any, denoiser: str, scheme: Any, model: str):
        self.pipe, self.denoiser, self.scheme, self.model = pipe, denoiser, scheme, model
        self.altered = False
        attach = getattr(scheme, "lora_attach", None)
        self.native = attach(pipe, denoiser) if attach is not None else None

    @property
    def module(self) -> Any:
        return getattr(self.pipe, self.denoiser)

    def load(self, lora: LoraFile, name: str | None = None, strength: float | None = None) -> str:
        """Load ``lora`` as adapter ``name`` (default: the file's name); return the name.

        With ``strength``, this adapter alone is then active at that weight (``set_adapters``).
        Raises LoraUnsupported when the scheme's layers cannot take it, LoraMismatch when the
        file holds nothing for this denoiser.
        """
        name = name or lora.name
        reason = lora_unsupported_reason(self.scheme)
        if reason:
            raise LoraUnsupported(reason)
        if self.native is not None:
            return self.native.load(lora, name, strength)
        foreign = self._modules_not_here(lora)
        if foreign:
            # diffusers only warns about these and loads the rest: a LoRA of another model would
            # then apply in part, and every comparison after it would be of something else.
            raise LoraMismatch(f"LoRA {lora.path} ({lora.format} layout) does not fit {self.model}'s {self.denoiser}: "
                               f"{len(foreign)} of its target modules do not exist here (e.g. "
                               f"{', '.join(foreign[:3])}); it was made for another model")
        width = self._width_not_here(lora)
        if width:
            # peft wraps the layer anyway and the first forward fails inside torch or torchao
            raise LoraMismatch(f"LoRA {lora.path} ({lora.format} layout) does not fit {self.model}'s {self.denoiser}: "
                               f"{width}; it was made for another model or size")
        before = set(self.adapter_names())
        try:
            self.pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, NotImplementedError) as exc:
            self.altered = True
            if _PEFT_UNSUPPORTED in str(exc):
                raise LoraUnsupported(f"{self.scheme.name}: peft cannot wrap its layers with a LoRA: {exc}") from exc
            if isinstance(exc, KeyError) and str(exc).strip("'\"").endswith(".weight"):
                # diffusers' FLUX loader reads each targeted module's weight before peft runs
                raise LoraUnsupported(f"{self.scheme.name}: its layers are not plain linears (diffusers found no "
                                      f"{exc} where the LoRA attaches), and peft has no LoRA layer for them") from exc
            if any(text in str(exc) for text in _MISMATCH):
                raise LoraMismatch(f"LoRA {lora.path} ({lora.format} layout) does not fit {self.model}'s "
                                   f"{self.denoiser} as loaded here: {exc}") from exc
            raise
        if name not in set(self.adapter_names()) - before:
            raise LoraMismatch(f"LoRA {lora.path} ({lora.format} layout) holds no weights for {self.model}'s "
                               f"{self.denoiser}: diffusers loaded nothing from it")
        if strength is not None:
            self.set_strengths({name: strength})
        return name

    def _modules_not_here(self, lora: LoraFile) -> list[str]:
        """Modules a diffusers-layout (``peft``) LoRA targets that this denoiser lacks."""
        if lora.format != "peft":
            return []  # other layouts are renamed by diffusers' converters, which refuse unknown keys
        from safetensors import safe_open

        prefix = f"{self.denoiser}."
        with safe_open(str(lora.path), framework="pt") as fh:
            targets = {k[len(prefix):].split(".lora_A.")[0] for k in fh.keys()
                       if k.startswith(prefix) and ".lora_A." in k}
        present = {name for name, _ in self.module.named_modules()}
        return sorted(targets - present)

    def _width_not_here(self, lora: LoraFile) -> str | None:
        """The first layer whose LoRA matrices do not fit its widths (diffusers-layout LoRAs), or None."""
        if lora.format != "peft":
            return None
        from safetensors import safe_open

        prefix = f"{self.denoiser}."
        with safe_open(str(lora.path), framework="pt") as fh:
            for key in sorted(k for k in fh.keys() if k.startswith(prefix) and ".lora_A." in k):
                name = key[len(prefix):].split(".lora_A.")[0]
                try:
                    layer = self.module.get_submodule(name)
                except AttributeError:
                    continue  # reported by _modules_not_here
                widths = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
                a = tuple(fh.get_slice(key).get_shape())
                b_key = key.replace(".lora_A.", ".lora_B.")
                b = tuple(fh.get_slice(b_key).get_shape()) if b_key in fh.keys() else None
                if widths[0] is not None and len(a) == 2 and a[1] != widths[0]:
                    return f"{name} takes {widths[0]} inputs, its lora_A has {a[1]} columns"
                if widths[1] is not None and b is not None and len(b) == 2 and b[0] != widths[1]:
                    return f"{name} gives {widths[1]} outputs, its lora_B has {b[0]} rows"
        return None

    def adapter_names(self) -> list[str]:
        """Adapters present in the denoiser (loaded, whether active or not)."""
        if self.native is not None:
            return self.native.adapter_names()
        return list(self.pipe.get_list_adapters().get(self.denoiser, []))

    def set_strengths(self, strengths: dict[str, float]) -> None:
        """Activate exactly these adapters with these weights (``set_adapters``)."""
        if self.native is not None:
            return self.native.set_strengths(strengths)
        self.pipe.set_adapters(list(strengths), adapter_weights=[float(s) for s in strengths.values()])

    def fuse(self) -> None:
        """Fuse the active adapters into the denoiser's weights (``fuse_lora``)."""
        if self.native is not None:
            return self.native.fuse()  # refuses, saying why: the LoRA is in the low-rank branch already
        self.altered = True
        self.pipe.fuse_lora(components=[self.denoiser])

    def unfuse(self) -> None:
        """Take the fused deltas out of the weights again (``unfuse_lora``)."""
        if self.native is not None:
            return self.native.unfuse()
        self.pipe.unfuse_lora(components=[self.denoiser])

    def unload(self) -> None:
        """Remove every LoRA (``unload_lora_weights``)."""
        if self.native is not None:
            return self.native.unload()
        self.pipe.unload_lora_weights()

    def wrapped_layers(self) -> int:
        """How many of the denoiser's layers carry a LoRA now."""
        if self.native is not None:
            return self.native.wrapped_layers()
        return len(_tuner_layers(self.module))

    def close(self) -> None:
        """Unfuse (if fused) and unload everything, whatever state a failed test left."""
        if self.native is not None:
            return self.native.close()
        if self.pipe is None or importlib.util.find_spec("peft") is None:
            return  # released, or nothing can have been loaded
        if any(layer.merged for layer in _tuner_layers(self.module)):
            self.unfuse()
        if self.wrapped_layers() or self.adapter_names():
            self.unload()
