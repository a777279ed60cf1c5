"""Checking files a cache wrote before reusing them: safetensors headers and directory manifests.

A cache entry (synthetic weights, a quantized checkpoint, a synthetic LoRA) is a directory
written under a temporary name, with a manifest written last that records every file's size.
On reuse the manifest must be present and readable, name what the caller expects, and every
file must have its recorded size; a safetensors file must also have a whole header whose
tensors end exactly at the end of the file. A damaged entry is rebuilt, never trusted.

Sizes and header shape miss an edit that keeps both: a changed dtype, shape or data offset
in a header, or flipped bytes in the data. So the manifest also records, per safetensors
file, the SHA-256 of its header (every tensor's name, dtype, shape and offsets) and of a
sample of its data (three 64 KiB blocks: the start, the middle and the end), read again on
every reuse: a few milliseconds per file, against minutes for hashing 34 GB. A header edit
is always caught; a data edit only where it touches a sampled block (stated, not hidden).
"""

from __future__ import annotations

import hashlib
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


_SAMPLE = 64 * 1024


def content_marks(path: Path) -> dict[str, str]:
    """The header and data-sample digests of a safetensors file (see the module docstring)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = hashlib.sha256(fh.read(header_len)).hexdigest()
        data_start = 8 + header_len
        sample = hashlib.sha256()
        for offset in sorted({data_start, data_start + (size - data_start) // 2, max(data_start, size - _SAMPLE)}):
            fh.seek(offset)
            sample.update(fh.read(_SAMPLE))
    return {"header_sha256": header, "sample_sha256": sample.hexdigest()}


def safetensors_marks(directory: Path) -> dict[str, dict[str, str]]:
    """``content_marks`` of every safetensors file below ``directory``, by relative path."""
    return {str(p.relative_to(directory)): content_marks(p) for p in sorted(directory.rglob("*.safetensors"))
            if p.is_file()}


def marks_problem(directory: Path, recorded: Mapping[str, Mapping[str, str]]) -> str | None:
    """Why a file's header or data sample no longer matches what its writer recorded, or None
    (a manifest written before marks were recorded has none to compare)."""
    for rel, marks in (recorded or {}).items():
        path = directory / rel
        try:
            now = content_marks(path)
        except (OSError, ValueError, struct.error) as exc:
            return f"{path} cannot be read as safetensors: {exc}"
        for key, what in (("header_sha256", "its header (a tensor's dtype, shape or offsets)"),
                          ("sample_sha256", "its data")):
            if key in marks and now[key] != marks[key]:
                return f"{path}: {what} changed since it was written (recorded {key} {marks[key][:12]}..., now " \
                       f"{now[key][:12]}...)"
    return None


def file_sizes(directory: Path, manifest: str) -> dict[str, int]:
    """Every file below ``directory`` but the manifest, with its size."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != manifest}


def write_manifest(directory: Path, manifest: str, facts: Mapping[str, Any]) -> None:
    """Write ``directory/manifest``: ``facts`` and the size of every other file (write it last)."""
    document = {**facts, "files": file_sizes(directory, manifest), "marks": safetensors_marks(directory)}
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
    return marks_problem(directory, document.get("marks") or {})
