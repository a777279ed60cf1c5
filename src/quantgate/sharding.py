"""Deterministic shards of a gate run: whole pipeline groups per shard, balanced by test count.

Every runner of a sharded run computes the same assignment from the same collection, so
``--quantgate-shard 1/N`` ... ``N/N`` are disjoint and together cover the selection.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def pipeline_group(key: tuple[str, ...]) -> str:
    """The xdist group and shard unit of a pipeline key: tests sharing a pipeline share it."""
    return "-".join(key)


SPREAD_UNITS = ("pipeline", "model")


def spread_unit(key: tuple[str, ...], unit: str) -> str:
    """What one worker or shard gets whole: a pipeline, or every pipeline of one model on one
    device and source (``model``: the cases a speedup or a session-reference comparison reads)."""
    return pipeline_group(key if unit == "pipeline" else key[:3])


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/N"`` as ``(i, N)`` with ``1 <= i <= N``; ValueError saying what is wrong otherwise."""
    match = _SHARD.match(value)
    if not match:
        raise ValueError(f"--quantgate-shard takes i/N (e.g. 2/4), got {value!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"--quantgate-shard {value}: need 1 <= i <= N and N >= 1")
    return index, count


def assign_shards(groups: Mapping[str, int], count: int) -> dict[str, int]:
    """Shard (1-based) of each group, given each group's test count.

    Largest groups first, each onto the shard with the fewest tests so far (ties: lowest
    shard, then group name), so the result depends only on the groups, not on their order.
    """
    loads = [0] * count
    shards = {}
    for name, size in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        shard = min(range(count), key=lambda s: (loads[s], s))
        loads[shard] += size
        shards[name] = shard + 1
    return shards


def selection_digest(groups: Mapping[str, int]) -> str:
    """A fingerprint of the unsharded selection: shards of one run carry the same one."""
    text = "\n".join(f"{name}\t{size}" for name, size in sorted(groups.items()))
    return hashlib.sha256(text.encode()).hexdigest()
