"""Which GPUs the workers of a distributed run get, found without initializing CUDA.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when it initializes; torch does that on the first
CUDA call. The list is therefore decided by the controller process (which never touches
CUDA for this) and each worker sets its entry before anything in it initializes CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def parse_gpus(value: str) -> list[str]:
    """``"0,1"`` (indices, UUIDs or MIG ids, as CUDA_VISIBLE_DEVICES takes them) as a list."""
    gpus = [v.strip() for v in value.split(",") if v.strip()]
    if not gpus:
        raise ValueError(f"--quantgate-gpus takes a comma-separated list of GPUs (e.g. 0,1), got {value!r}")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--quantgate-gpus lists a GPU twice: {value!r} (one GPU per worker)")
    return gpus


def visible_gpus(environ: Mapping[str, str] | None = None, smi: str | None = None) -> list[str]:
    """The GPUs this process may hand out: its ``CUDA_VISIBLE_DEVICES`` if set, else every GPU
    ``nvidia-smi -L`` lists (indices), else none."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        listed = [v.strip() for v in environ["CUDA_VISIBLE_DEVICES"].split(",") if v.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide every GPU.
        return [] if not listed or listed[0].startswith("-") else listed
    smi = smi or shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [match for match in _SMI_LINE.findall(out)]


def gpus_for_workers(gpus: list[str], workers: int, given: bool) -> list[str | None]:
    """One GPU per worker; ``[None] * workers`` on a machine without GPUs (nothing to pin).

    More workers than GPUs is a ValueError: two workers on one GPU would time each other.
    """
    if not gpus and not given:
        return [None] * workers
    if workers > len(gpus):
        source = "--quantgate-gpus" if given else "visible GPUs (CUDA_VISIBLE_DEVICES or nvidia-smi -L)"
        raise ValueError(f"{workers} xdist workers but {len(gpus)} {source}: {','.join(gpus) or 'none'}; "
                         f"use -n {max(len(gpus), 1)} or list more GPUs (one GPU per worker keeps timings sound)")
    return list(gpus[:workers])
