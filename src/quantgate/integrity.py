"""Checking files a cache wrote before reusing them: safetensors headers and directory manifests.

A cache entry (synthetic weights, a quantized checkpoint, a synthetic LoRA) is a directory
written under a temporary name, with a manifest written last that records every file's size.
On reuse the manifest must be present and readable, name what the caller expects, and every
file must have its recorded size; a safetensors file must also have a whole header whose
tensors end exactly at the end of the file. A damaged entry is rebuilt, never trusted.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (truncated, bad header), or ``None`` if it is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"{path} is truncated (no header)"
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                return f"{path} is truncated (header of {header_len} bytes in a {size}-byte file)"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path} cannot be read as safetensors: {exc}"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{path} is truncated or padded: header says {8 + header_len + end} bytes, file has {size}"
    return None


def file_sizes(directory: Path, manifest: str) -> dict[str, int]:
    """Every file below ``directory`` but the manifest, with its size."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != manifest}


def write_manifest(directory: Path, manifest: str, facts: Mapping[str, Any]) -> None:
    """Write ``directory/manifest``: ``facts`` and the size of every other file (write it last)."""
    document = {**facts, "files": file_sizes(directory, manifest)}
    (directory / manifest).write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def manifest_problem(directory: Path, manifest: str, expect: Mapping[str, Any]) -> str | None:
    """Why ``directory`` cannot be reused (see the module docstring), or None."""
    path = directory / manifest
    if not path.is_file():
        return f"{directory} has no {manifest} (an interrupted write?)"
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path} is unreadable: {exc}"
    for key, value in expect.items():
        if document.get(key) != value:
            return f"{path} records {key} {document.get(key)!r}, expected {value!r}"
    files = document.get("files") or {}
    if not files:
        return f"{path} lists no files"
    for rel, size in files.items():
        file = directory / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, the manifest recorded {size}"
        if file.suffix == ".safetensors" and (problem := safetensors_problem(file)):
            return problem
    return None
