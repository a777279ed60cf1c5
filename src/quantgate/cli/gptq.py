"""``quantgate gptq``: the GPTQ W4A8 plan's steps, one command each.

    quantgate gptq calibrate MODEL     run the pipeline on the calibration prompts, cache the Hessians
    quantgate gptq quantize MODEL      quantize with a scheme (gptq-w4a8 ...), cache the checkpoint
    quantgate gptq benchmark MODEL     the gate suite (pytest) on bf16, bnb-nf4, rtn-w4a8, gptq-w4a8
    quantgate gptq samples MODEL -o G  side-by-side images of bf16 and the W4A8 schemes

Each step reuses the caches of the one before (same model, source, seed, calibration prompts,
samples, steps and resolution give the same cache keys as a pytest run with the equivalent
``--quantgate-*`` options), so ``benchmark`` neither recalibrates nor requantizes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from quantgate.settings import (
    CACHE_DIR_HELP,
    RESOLUTION_HELP,
    cache_dir,
    calibration_settings,
    default_device,
    parse_resolution,
)

if TYPE_CHECKING:
    from quantgate.quant.calibration import CalibrationSettings

DEFAULT_BENCH_SCHEMES = "bf16,bnb-nf4,rtn-w4a8,gptq-w4a8"
DEFAULT_SAMPLE_SCHEMES = "bf16,rtn-w4a8,gptq-w4a8"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered model (quantgate models), e.g. sd35-medium")
    p.add_argument("--source", default="auto",
                   help="auto, hub, synthetic or tiny (default: auto: hub or synthetic on a GPU, tiny on the CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights and of calibration (default: 0)")
    p.add_argument("--calibration-prompts", default="fixtures/prompts/calibration.txt",
                   help="calibration prompt file (default: fixtures/prompts/calibration.txt)")
    p.add_argument("--samples", type=int,
                   help="calibration samples, one image each (default: 256 on a GPU, 16 on the CPU)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model card's)")
    p.add_argument("--resolution", help=f"{RESOLUTION_HELP} (default: the model card's)")


class _Context:
    """What every step needs, built from the common options as the pytest plugin builds them
    (``quantgate.settings``)."""

    def __init__(self, args: argparse.Namespace):
        from quantgate.models import get_model
        from quantgate.models.sources import SourceContext, choose_source

        self.args = args
        self.device = default_device(args.device)
        self.spec = get_model(args.model)
        self.ctx = SourceContext(cache_dir=cache_dir(args.cache_dir), seed=args.seed)
        self.source = choose_source(args.source, self.spec, "cpu" if self.device == "cpu" else "cuda", self.ctx)

    def resolution(self) -> tuple[int, int] | None:
        return parse_resolution(self.args.resolution, "--resolution")

    def case(self, scheme: str):
        from quantgate.cases import Selection, make_case

        selection = Selection(models=[self.spec.name], schemes=[scheme], steps=self.args.steps,
                              resolution=self.resolution())
        return make_case(self.spec, self.source, scheme, "eager", 1, self.device, selection)

    def calibration(self) -> CalibrationSettings:
        """The plugin's calibration settings for the same options: ``--samples`` sets both tiers,
        as ``--quantgate-calibration-samples`` does; the prompt file must exist."""
        return calibration_settings(self.args.calibration_prompts, seed=self.args.seed, samples=self.args.samples)

    def load(self, scheme: str):
        from quantgate.pipeline import load_pipeline

        return load_pipeline(self.case(scheme), self.ctx, self.calibration())


def _calibrate(args: argparse.Namespace) -> int:
    from quantgate.pipeline import weights_identity
    from quantgate.quant.calibration import select_linears
    from quantgate.quant.w4a8_model import BLOCK_LINEARS, calibrate_passes, calibration_facts, hessian_budget

    context = _Context(args)
    case = context.case("bf16")
    loaded = context.load("bf16")
    settings = context.calibration().for_device(case.device, case.call_kwargs())
    denoiser = loaded.denoiser
    layers = select_linears(denoiser, BLOCK_LINEARS)
    device = next(iter(layers.values())).weight.device
    start = time.perf_counter()
    records = [record for _chunk, _hessians, record in  # each pass cached, then dropped: one held at a time
               calibrate_passes(loaded.pipe, denoiser, layers, settings, weights_identity(loaded.spec, loaded.source),
                                context.ctx.cache_dir, budget=hessian_budget(device))]
    facts = calibration_facts(settings, records, time.perf_counter() - start)
    print(f"calibrated {len(layers)} linears of {context.spec.name} ({context.source}) on {settings.samples} samples "
          f"x {settings.call_kwargs['num_inference_steps']} steps in {facts['seconds']:.1f} s "
          f"(cache {facts['cache']})")
    for record in facts["passes"]:
        print(f"  {context.ctx.cache_dir / 'calibration' / (record['key'] + '.safetensors')}: "
              f"{record['layers']} layers, {record['cache']}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from quantgate.errors import QuantgateError
    from quantgate.schemes import get_scheme

    scheme = get_scheme(args.scheme)
    if scheme.post_load is None or "gptq" not in scheme.markers:
        raise QuantgateError(f"{args.scheme} is not a W4A8 scheme of this plan: use rtn-w4a8, gptq-w4a8 or "
                             "gptq-w4a8-g128")
    context = _Context(args)
    start = time.perf_counter()
    loaded = context.load(args.scheme)
    facts = loaded.notes[context.spec.denoiser]
    calibration = facts.get("calibration") or {}
    print(f"{args.scheme} on {context.spec.name} ({context.source}, {context.device}): {facts['layers']} linears, "
          f"checkpoint {facts['checkpoint']} ({facts.get('checkpoint_path', 'not cached')})")
    print(f"  calibration: {calibration.get('seconds', '-')} s (cache {calibration.get('cache', '-')}); "
          f"quantization: {facts.get('quantize_seconds')} s; load + quantize here: "
          f"{time.perf_counter() - start:.1f} s")
    print(f"  transformer: {loaded.denoiser_footprint.total_bytes / 2**30:.3f} GiB, "
          f"{loaded.denoiser_reference_bytes / loaded.denoiser_footprint.total_bytes:.3f}x smaller than bf16")
    return 0


def benchmark_command(args: argparse.Namespace) -> list[str]:
    """The pytest command line the benchmark step runs."""
    command = [sys.executable, "-m", "pytest", *args.tests, "-p", "no:cacheprovider",
               "--quantgate-models", args.model, "--quantgate-schemes", args.schemes,
               "--quantgate-source", args.source, "--quantgate-seed", str(args.seed),
               "--quantgate-calibration-prompts", args.calibration_prompts]
    if args.device:
        command += ["-m", "cpu" if args.device == "cpu" else "gpu"]
    for flag, value in (("--quantgate-cache-dir", args.cache_dir), ("--quantgate-calibration-samples", args.samples),
                        ("--quantgate-steps", args.steps), ("--quantgate-resolution", args.resolution),
                        ("--benchmark-json", args.benchmark_json)):
        if value is not None:
            command += [flag, str(value)]
    return command + shlex.split(args.pytest_args)


def _benchmark(args: argparse.Namespace) -> int:
    command = benchmark_command(args)
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(command)


def _samples(args: argparse.Namespace) -> int:
    from quantgate.measure.memory import release_memory
    from quantgate.prompts import PromptSet
    from quantgate.quality.grids import sample_grid

    context = _Context(args)
    prompts = PromptSet.load(args.prompts).take(args.count)
    columns: dict[str, Any] = {}
    for scheme in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        case = context.case(scheme)
        loaded = context.load(scheme)
        columns[scheme] = [loaded.generate(case, [prompt], seed=seed)[0] for seed, prompt in enumerate(prompts)]
        print(f"  {scheme}: {len(prompts)} images", file=sys.stderr)
        loaded.pipe = None
        del loaded
        release_memory(context.device)
    print(sample_grid(columns, prompts, args.output))
    return 0


def register(sub: Any) -> None:
    """Register ``quantgate gptq`` and its steps on the main parser's subcommands."""
    gptq = sub.add_parser("gptq", help="GPTQ W4A8: calibrate, quantize, benchmark, side-by-side samples",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = gptq.add_subparsers(dest="gptq_command", required=True)

    p = steps.add_parser("calibrate", help="run the pipeline on the calibration prompts; cache every block "
                                           "linear's Hessian 2XXᵀ (streaming, nothing else is stored)",
                         description="Loads the bf16 pipeline, hooks every linear of the transformer blocks, "
                                     "generates one image (to latents) per calibration sample over the sampler's "
                                     "timesteps and caches the Hessians under <cache>/calibration. A tqdm bar "
                                     "counts samples.")
    _common(p)
    p.set_defaults(func=_calibrate)

    p = steps.add_parser("quantize", help="quantize with a W4A8 scheme and cache the checkpoint (safetensors + JSON)",
                         description="Loads the pipeline with the scheme, which calibrates (or reuses the "
                                     "calibration cache), quantizes layer stacks with a tqdm bar and saves the "
                                     "checkpoint under <cache>/quantized/<key>; prints times and the footprint.")
    _common(p)
    p.add_argument("--scheme", default="gptq-w4a8", help="rtn-w4a8, gptq-w4a8 or gptq-w4a8-g128 (default: gptq-w4a8)")
    p.set_defaults(func=_quantize)

    p = steps.add_parser("benchmark",
                         help="run the gate suite (pytest) on the plan's schemes: the suite is the benchmark",
                         description="Runs pytest over the gate tests with the plan's selection: footprint, peak "
                                     "VRAM, latency (pytest-benchmark; speedups vs bf16 and bnb-nf4 on a GPU), "
                                     "transformer-output error vs bf16, GPTQ's error vs rtn-w4a8, image PSNR/SSIM. "
                                     "Quantized checkpoints come from the cache of the quantize step.")
    _common(p)
    p.add_argument("--schemes", default=DEFAULT_BENCH_SCHEMES, help=f"default: {DEFAULT_BENCH_SCHEMES}")
    p.add_argument("--tests", nargs="+", default=["tests"], help="test paths (default: tests)")
    p.add_argument("--benchmark-json", help="where pytest-benchmark writes its JSON (for quantgate report)")
    p.add_argument("--dry-run", action="store_true", help="print the pytest command without running it")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, one string (e.g. \"-k footprint -x\")")
    p.set_defaults(func=_benchmark)

    p = steps.add_parser("samples", help="write a side-by-side image grid of bf16 and the W4A8 schemes",
                         description="Generates one image per prompt (seeds 0, 1, ...) with each scheme, one "
                                     "pipeline at a time, and writes one PNG: a row per prompt, a column per scheme.")
    _common(p)
    p.add_argument("--schemes", default=DEFAULT_SAMPLE_SCHEMES, help=f"default: {DEFAULT_SAMPLE_SCHEMES}")
    p.add_argument("--prompts", default="fixtures/prompts/inspect.txt",
                   help="prompt file (default: fixtures/prompts/inspect.txt)")
    p.add_argument("--count", type=int, default=4, help="images per scheme (default: 4)")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.set_defaults(func=_samples)
