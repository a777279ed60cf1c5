"""The golden image store: reference images with a manifest, written only on request.

Layout: ``<root>/<model>/<source>/`` holds ``NN-seedS.png`` (8-bit RGB) and ``manifest.json``
with the generation settings, prompt and seed of every image, its sha256, and the library
versions and device that made it. A set is written atomically (a temporary directory renamed
into place). Loading checks everything: a missing set is a skip that says how to create it;
a file whose hash, or a manifest whose settings or prompts, do not match is an error, never a
silent comparison against the wrong thing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.atomic import atomic_directory, file_lock
from quantgate.errors import QuantgateError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class GoldenMissing(QuantgateError):
    """No golden set for this model and source: tests skip, saying how to create one."""


class GoldenInvalid(QuantgateError):
    """A golden set that does not match its manifest or this run's settings: an error."""


@dataclass(frozen=True)
class GoldenImage:
    file: str
    prompt: str
    seed: int
    sha256: str


@dataclass(frozen=True)
class GoldenSet:
    directory: Path
    model: str
    source: str
    settings: Mapping[str, Any]
    images: tuple[GoldenImage, ...]
    manifest: Mapping[str, Any]

    def array(self, index: int) -> np.ndarray:
        """Image ``index`` as float32 (H, W, 3) in [0, 1]."""
        from PIL import Image

        with Image.open(self.directory / self.images[index].file) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def golden_dir(root: str | Path, model: str, source: str) -> Path:
    return Path(root) / model / source


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _how_to_create(model: str, source: str) -> str:
    return (f"create them with `quantgate golden {model} --source {source}` or run pytest with "
            f"--quantgate-update-golden")


def load_golden(root: str | Path, model: str, source: str, settings: Mapping[str, Any],
                prompts: Sequence[tuple[str, int]]) -> GoldenSet:
    """The verified golden set of ``model``/``source`` for ``settings`` and (prompt, seed) pairs."""
    directory = golden_dir(root, model, source)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise GoldenMissing(f"no golden images for {model}/{source} in {directory}: {_how_to_create(model, source)}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GoldenInvalid(f"{manifest_path} is unreadable ({exc}): {_how_to_create(model, source)}") from None
    if not isinstance(manifest, dict):
        raise GoldenInvalid(f"{manifest_path} is not a golden manifest (a JSON object): "
                            f"{_how_to_create(model, source)}")
    if manifest.get("format") != FORMAT_VERSION:
        raise GoldenInvalid(f"{manifest_path} has format {manifest.get('format')}, expected {FORMAT_VERSION}: "
                            f"{_how_to_create(model, source)}")
    recorded = manifest.get("settings", {})
    differing = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
    if differing:
        detail = ", ".join(f"{k} {old!r} (this run: {new!r})" for k, (old, new) in differing.items())
        raise GoldenInvalid(f"{manifest_path} was generated with {detail}: refresh the golden set "
                            f"({_how_to_create(model, source)}) or run with its settings")
    try:
        images = tuple(GoldenImage(str(i["file"]), i["prompt"], int(i["seed"]), str(i["sha256"]))
                       for i in manifest.get("images", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise GoldenInvalid(f"{manifest_path} has a malformed image entry ({type(exc).__name__}: {exc}): "
                            f"{_how_to_create(model, source)}") from None
    if len(images) < len(prompts):
        raise GoldenInvalid(f"{manifest_path} holds {len(images)} images, this run compares {len(prompts)}")
    for image, (prompt, seed) in zip(images, prompts, strict=False):  # a golden set may hold more images than a run compares
        if (image.prompt, image.seed) != (prompt, seed):
            raise GoldenInvalid(f"{manifest_path}: {image.file} was made for prompt {image.prompt!r} seed {image.seed}, "
                                f"this run asks {prompt!r} seed {seed}: {_how_to_create(model, source)}")
        path = directory / image.file
        if not path.is_file():
            raise GoldenInvalid(f"{path} is listed in {MANIFEST} but missing: restore it from git or "
                                f"{_how_to_create(model, source)}")
        if _sha256(path) != image.sha256:
            raise GoldenInvalid(f"{path} does not match the sha256 in {MANIFEST} (changed or truncated): "
                                f"restore it from git or {_how_to_create(model, source)}")
    return GoldenSet(directory, model, source, recorded, images, manifest)


def write_golden(root: str | Path, model: str, source: str, settings: Mapping[str, Any],
                 entries: Sequence[tuple[str, int, np.ndarray]], provenance: Mapping[str, Any]) -> GoldenSet:
    """Replace the golden set of ``model``/``source`` atomically with ``entries`` (prompt, seed, image)."""
    directory = golden_dir(root, model, source)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # One writer at a time: a second one waits, then replaces the first's set whole.
    with file_lock(directory.parent / f".{directory.name}.lock"):
        return _write_golden_locked(root, model, source, settings, entries, provenance, directory)


def _write_golden_locked(root: str | Path, model: str, source: str, settings: Mapping[str, Any],
                         entries: Sequence[tuple[str, int, np.ndarray]], provenance: Mapping[str, Any],
                         directory: Path) -> GoldenSet:
    from PIL import Image

    records = []
    with atomic_directory(directory) as tmp:
        for index, (prompt, seed, image) in enumerate(entries):
            name = f"{index:02d}-seed{seed}.png"
            pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(tmp / name, optimize=True)
            records.append({"file": name, "prompt": prompt, "seed": seed, "sha256": _sha256(tmp / name)})
        manifest = {"format": FORMAT_VERSION, "model": model, "source": source, "settings": dict(settings),
                    "images": records, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **dict(provenance)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return load_golden(root, model, source, settings, [(p, s) for p, s, _ in entries])
