"""The stage breakdown of one pipeline call: text encoding, each denoising step, VAE decoding,
and the rest; the pipeline is left exactly as it was."""

import time

import torch

from quantgate.measure.stages import stage_times, time_stages


class _Denoiser(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.01)
        return x


class _Vae:
    def decode(self, latents):
        time.sleep(0.02)
        return latents


class _Pipe:
    """A pipeline's shape as diffusers calls it: self.encode_prompt, self.transformer(...), self.vae.decode."""

    def __init__(self, steps):
        self.transformer, self.vae, self.steps = _Denoiser(), _Vae(), steps

    def encode_prompt(self, prompt):
        time.sleep(0.03)
        return torch.zeros(1)

    def __call__(self, prompt):
        latents = self.encode_prompt(prompt)
        for _ in range(self.steps):
            latents = self.transformer(latents)
        time.sleep(0.005)  # the scheduler and post-processing: "other"
        return self.vae.decode(latents)


def test_each_stage_is_timed_and_the_rest_is_other():
    pipe = _Pipe(steps=3)
    stages = time_stages(pipe, pipe.transformer, "cpu", lambda: pipe("a prompt"))
    assert stages["steps"] == 3 and len(stages["denoising_steps_s"]) == 3
    assert all(s >= 0.01 for s in stages["denoising_steps_s"])
    assert abs(stages["denoising_s"] - sum(stages["denoising_steps_s"])) < 1e-5
    assert stages["text_encoding_s"] >= 0.03 and stages["vae_decode_s"] >= 0.02
    assert 0.005 <= stages["other_s"] < stages["wall_s"]
    assert stages["clock"] == "perf_counter"


def test_the_pipeline_is_restored_and_a_wrapper_already_there_is_left_alone():
    pipe = _Pipe(steps=2)
    before = {k: dict(vars(o)) for k, o in (("pipe", pipe), ("den", pipe.transformer), ("vae", pipe.vae))}
    with stage_times(pipe, pipe.transformer, "cpu") as times:
        pipe("x")
    assert len(times.marks["denoising_steps"]) == 2
    after = {k: dict(vars(o)) for k, o in (("pipe", pipe), ("den", pipe.transformer), ("vae", pipe.vae))}
    assert after == before  # no instance attribute left behind (the fingerprint would see it)

    mine = []
    pipe.vae.decode = lambda latents: mine.append(1) or latents  # someone else's instance wrapper
    with stage_times(pipe, pipe.transformer, "cpu") as times:
        pipe("x")
    assert mine == [1] and times.marks["vae_decode"] == []  # left in place, not timed, not removed
    assert "decode" in vars(pipe.vae)


def test_a_failing_call_still_restores_the_pipeline():
    pipe = _Pipe(steps=1)

    def boom(latents):
        raise RuntimeError("out of memory")

    pipe.transformer.forward = boom
    try:
        with stage_times(pipe, pipe.transformer, "cpu"):
            pipe("x")
    except RuntimeError:
        pass
    assert "encode_prompt" not in vars(pipe) and "decode" not in vars(pipe.vae)
