"""Where one prompt-to-image call spends its time: text encoding, each denoising step, VAE decoding.

``stage_times(pipe, denoiser, device)`` wraps three calls of a diffusers pipeline for the
duration of a ``with`` block: ``pipe.encode_prompt``, the denoiser's ``forward`` (one call per
denoising step; classifier-free guidance batches both halves into one call) and
``pipe.vae.decode``. On CUDA each call is bracketed by CUDA events, read after one synchronize
at the end, so the stages cost no extra synchronization inside the call; on the CPU by
``time.perf_counter``. The wrappers are instance attributes, deleted on exit, so the pipeline
is left exactly as it was (the class methods were never touched).

The breakdown comes from one call outside the timed rounds, so a regression in the end-to-end
median can be pinned to a component: ``other_s`` is the rest of the call (scheduler, latent
preparation, image post-processing) against the call's own wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from quantgate.measure.memory import synchronize


class _Clock:
    """Start/stop marks: CUDA events on a GPU, perf_counter elsewhere; seconds once ``settle``d."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1e3
        return end - start


@dataclass
class StageTimes:
    """The marks of one call's stages, turned into seconds by ``as_dict`` after the call."""

    clock: _Clock
    marks: dict[str, list[tuple[Any, Any]]] = field(default_factory=lambda: {
        "text_encoding": [], "denoising_steps": [], "vae_decode": []})
    wall_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """``text_encoding_s``, ``denoising_steps_s`` (each step), ``denoising_s`` (their sum),
        ``vae_decode_s``, ``steps``, ``wall_s`` and ``other_s`` (wall minus the stages)."""
        seconds = {name: [self.clock.seconds(a, b) for a, b in pairs] for name, pairs in self.marks.items()}
        out: dict[str, Any] = {
            "text_encoding_s": round(sum(seconds["text_encoding"]), 6),
            "denoising_steps_s": [round(s, 6) for s in seconds["denoising_steps"]],
            "denoising_s": round(sum(seconds["denoising_steps"]), 6),
            "vae_decode_s": round(sum(seconds["vae_decode"]), 6),
            "steps": len(seconds["denoising_steps"]),
            "wall_s": None if self.wall_s is None else round(self.wall_s, 6),
            "clock": "cuda events" if self.clock.cuda else "perf_counter",
        }
        staged = out["text_encoding_s"] + out["denoising_s"] + out["vae_decode_s"]
        out["other_s"] = None if self.wall_s is None else round(self.wall_s - staged, 6)
        return out


def _wrap(owner: Any, name: str, stage: list[tuple[Any, Any]], clock: _Clock) -> None:
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock.mark()
        result = original(*args, **kwargs)
        stage.append((start, clock.mark()))
        return result

    # object's setattr: past nn.Module's and DiffusionPipeline's own (a function is neither a
    # submodule nor a config entry), straight into the instance dict that ``stage_times`` cleans
    object.__setattr__(owner, name, timed)


@contextmanager
def stage_times(pipe: Any, denoiser: torch.nn.Module, device: str) -> Iterator[StageTimes]:
    """Time the stages of the pipeline calls inside the block; the pipeline is restored after."""
    clock = _Clock(device)
    times = StageTimes(clock)
    targets = [(pipe, "encode_prompt", "text_encoding"), (denoiser, "forward", "denoising_steps"),
               (pipe.vae, "decode", "vae_decode")]
    wrapped = []
    try:
        for owner, name, stage in targets:
            if name in vars(owner):  # already an instance attribute: someone else's wrapper; leave it
                continue
            _wrap(owner, name, times.marks[stage], clock)
            wrapped.append((owner, name))
        yield times
    finally:
        for owner, name in wrapped:
            vars(owner).pop(name, None)


def time_stages(pipe: Any, denoiser: torch.nn.Module, device: str, call: Callable[[], Any]) -> dict[str, Any]:
    """One ``call`` of the pipeline with its stages timed; the breakdown as ``StageTimes.as_dict``."""
    synchronize(device)
    with stage_times(pipe, denoiser, device) as times:
        start = time.perf_counter()
        call()
        synchronize(device)
        times.wall_s = time.perf_counter() - start
    return times.as_dict()
