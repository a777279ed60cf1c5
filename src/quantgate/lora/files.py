"""LoRA files: what one is, which format it is in, and where a user's comes from.

A user names LoRAs with ``--quantgate-lora [MODEL=]SOURCE`` (repeatable, or comma-separated):
SOURCE is a ``.safetensors`` file (or a directory holding one), or ``hub:ORG/REPO[/FILE]``,
read from the Hugging Face cache offline, never downloaded. ``MODEL=`` binds it to one
registered model; without it the LoRA is tried on every selected model. Files in the
diffusers/peft layout and in kohya's (sd-scripts) layout are both loaded by diffusers'
``load_lora_weights``, which converts kohya keys itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import QuantgateError, SourceInvalid, SourceUnavailable

HUB_PREFIX = "hub:"
# The file name diffusers' save_lora_weights writes and load_lora_weights looks for first.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# Key patterns of the layouts diffusers converts; the first that matches names the format.
_FORMATS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kohya", re.compile(r"\.lora_(down|up)\.weight$|^lora_unet_")),
    ("peft", re.compile(r"\.lora_[AB]\.weight$")),
)


class LoraUnsupported(QuantgateError):
    """A LoRA cannot be applied to this scheme's pipeline; tests skip with the message."""


class LoraMismatch(QuantgateError):
    """A LoRA file has no weights for this model's denoiser; tests skip with the message."""


@dataclass(frozen=True)
class LoraFile:
    """One LoRA on disk and where it came from (``synthetic``, ``path`` or ``hub``)."""

    path: Path
    kind: str
    format: str
    detail: str
    model: str | None = None  # the model it was made for or bound to; None: any
    recipe: dict[str, Any] = field(default_factory=dict)  # synthetic: how it was made

    @property
    def name(self) -> str:
        """A short adapter name: the file's stem, made safe for peft's module names."""
        stem = self.path.stem if self.path.name != LORA_WEIGHT_NAME else self.path.parent.name
        return re.sub(r"\W", "_", stem)

    def describe(self) -> dict[str, Any]:
        """Facts for a benchmark record."""
        return {"path": str(self.path), "kind": self.kind, "format": self.format, "detail": self.detail,
                "model": self.model, **({"recipe": self.recipe} if self.recipe else {})}


def lora_format(path: Path) -> str:
    """``peft`` (diffusers' layout), ``kohya``, or ``unknown``, read from the tensor names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    for name, pattern in _FORMATS:
        if any(pattern.search(k) for k in keys):
            return name
    return "unknown"


@dataclass(frozen=True)
class UserLora:
    """One ``--quantgate-lora`` entry, before it is looked up on disk."""

    source: str
    model: str | None = None

    @property
    def id(self) -> str:
        """A test-id fragment: the file or repo name."""
        tail = self.source.removeprefix(HUB_PREFIX).rstrip("/").split("/")[-1]
        return re.sub(r"[^\w.-]", "_", Path(tail).stem or tail)


def parse_lora_option(values: list[str], models: list[str]) -> list[UserLora]:
    """The entries of ``--quantgate-lora`` (repeatable, comma-separated); raises SourceInvalid."""
    entries = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            model, sep, source = item.partition("=")
            if not sep:
                model, source = "", item
            if sep and model not in models:
                raise SourceInvalid(f"--quantgate-lora {item}: unknown model {model!r}; valid models: "
                                    f"{', '.join(sorted(models))}")
            if not source:
                raise SourceInvalid(f"--quantgate-lora takes [MODEL=]PATH or [MODEL=]hub:ORG/REPO[/FILE], got {item!r}")
            entries.append(UserLora(source, model or None))
    return entries


def _single_file(directory: Path, what: str) -> Path:
    if (directory / LORA_WEIGHT_NAME).is_file():
        return directory / LORA_WEIGHT_NAME
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise SourceInvalid(f"{what} holds no *.safetensors LoRA file")
    raise SourceInvalid(f"{what} holds several LoRA files ({', '.join(f.name for f in files)}): name one of them")


def _hub_file(spec: str, hub_cache: Path) -> tuple[Path, str]:
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = spec.removeprefix(HUB_PREFIX).strip("/").split("/")
    if len(parts) < 2:
        raise SourceInvalid(f"--quantgate-lora {spec}: a hub LoRA is hub:ORG/REPO or hub:ORG/REPO/FILE")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if filename:
            path = Path(hf_hub_download(repo, filename, local_files_only=True, cache_dir=hub_cache))
        else:
            snapshot = Path(snapshot_download(repo, local_files_only=True, cache_dir=hub_cache,
                                              allow_patterns=["*.safetensors"]))
            path = _single_file(snapshot, f"the cached snapshot of {repo}")
            filename = path.name
    except SourceInvalid:
        raise
    except Exception as exc:  # LocalEntryNotFoundError and friends; never a download
        fetch = f"hf download {repo} {filename}".strip()
        raise SourceUnavailable(
            f"LoRA {repo}{'/' + filename if filename else ''} is not in the Hugging Face cache at {hub_cache} and "
            f"quantgate never downloads during a run: fetch it once on this runner (`{fetch}`) "
            f"({type(exc).__name__})") from None
    return path, f"{repo}/{filename}@{path.parent.name}"


def resolve_user_lora(entry: UserLora, hub_cache: Path) -> LoraFile:
    """The file behind a ``--quantgate-lora`` entry; SourceUnavailable (skip) or SourceInvalid."""
    if entry.source.startswith(HUB_PREFIX):
        path, detail = _hub_file(entry.source, hub_cache)
        kind = "hub"
    else:
        path = Path(entry.source).expanduser()
        if path.is_dir():
            path = _single_file(path, str(path))
        elif not path.is_file():
            raise SourceInvalid(f"--quantgate-lora {entry.source}: no such file or directory")
        kind, detail = "path", str(path)
    try:
        fmt = lora_format(path)
    except Exception as exc:  # a truncated or foreign file: the user must fix the path
        raise SourceInvalid(f"--quantgate-lora {entry.source}: {path} is not a readable safetensors file "
                            f"({type(exc).__name__}: {exc})") from None
    return LoraFile(path.resolve(), kind, fmt, detail, model=entry.model)
