"""The ``quantgate`` command line: inspect registries, check this machine, pre-build caches.

    quantgate models                      registered models and their defaults
    quantgate schemes [--device cuda]     schemes, and whether each can run here (or why not)
    quantgate materialize MODEL ...       build a synthetic/tiny weight directory ahead of a run
    quantgate report BENCH.json -o DIR    HTML report + Markdown twin (checklist, plots, recommendations)
    quantgate summary BENCH.json          the report's Markdown twin on standard output
    quantgate compare OLD.json NEW.json   rank test of each case's rounds across commits; exit 1 on a regression
    quantgate merge A.json B.json -o M    join runs split over several commands into one JSON
    quantgate regate RUN.json [--changed] a run's measured values against the current gates.toml
    quantgate golden MODEL --source tiny  write a model's golden images from its bf16 pipeline
    quantgate env                         GPU, driver, CUDA and library versions as JSON
    quantgate gptq calibrate|quantize|benchmark|samples MODEL
                                          the GPTQ W4A8 plan, step by step (--help on each)
    quantgate eval MODEL --captions F --reference-dir D --out O
                                          generate for a caption set, FID and CLIP score (resumable)
    quantgate cache list|clear            what the suite keeps on disk; clear by kind, age or size (LRU)
    quantgate plan [NAME]                 what a plan selects (fixtures/plans/) and its expected time
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from quantgate import __version__
from quantgate.errors import QuantgateError


def _models(args: argparse.Namespace) -> int:
    from quantgate.models import get_model, model_names

    for name in model_names():
        spec = get_model(name)
        d = spec.defaults
        print(f"{name:14s} {spec.pipeline:26s} {spec.hub_repo:42s} steps={d['num_inference_steps']} "
              f"guidance={d['guidance_scale']} {d['height']}x{d['width']} max_seq={d['max_sequence_length']}")
        if args.verbose:
            print(f"  {spec.description}")
            for comp in spec.components:
                print(f"    {comp.name:16s} {comp.library}.{comp.cls}")
    return 0


def _schemes(args: argparse.Namespace) -> int:
    from quantgate.hardware import cuda_available, device_info, no_cuda_reason
    from quantgate.schemes import SCHEMES

    device = args.device or ("cuda" if cuda_available() else "cpu")
    if device.startswith("cuda") and not cuda_available():
        print(f"cannot check schemes on {device}: {no_cuda_reason()}", file=sys.stderr)
        return 2
    info = device_info(device)
    print(f"schemes on {info.name} ({info.hardware_class}{', ' + info.sm if info.sm else ''}):")
    for name, scheme in SCHEMES.items():
        reason = scheme.requires.unmet(name, info)
        status = "runs" if reason is None else f"skips: {reason}"
        print(f"  {name:18s} {scheme.summary}\n  {'':18s} -> {status}")
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from quantgate.models import get_model
    from quantgate.models.synthetic import materialize
    from quantgate.plugin import default_cache_dir

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    path = materialize(get_model(args.model), args.size, cache_dir, seed=args.seed, device=args.device)
    print(path)
    return 0


def shipped(name: str, relative: str) -> Path:
    """``relative`` (a repository data file) where the command runs, else the copy shipped in the
    package (``quantgate/data/NAME``), so that the commands work outside the repository."""
    here = Path(relative)
    if here.is_file():
        return here
    from importlib.resources import files

    return Path(str(files("quantgate") / "data" / name))


def _claims(path: str | None) -> Claims:  # noqa: F821 - imported lazily
    from quantgate.report.claims import load_claims

    claims = Path(path) if path else shipped("claims.toml", "fixtures/claims.toml")
    if not claims.is_file():
        raise QuantgateError(f"{claims} not found: pass --claims FILE (the repository's fixtures/claims.toml)")
    return load_claims(claims)


def _summary(args: argparse.Namespace) -> int:
    from quantgate.atomic import atomic_write_text
    from quantgate.report import load_runs
    from quantgate.report.build import build_report
    from quantgate.report.document import to_markdown

    text = to_markdown(build_report(load_runs(args.benchmark_json, args.allow_mixed_machines), _claims(args.claims),
                                    args.title))
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text, end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from quantgate.report import load_runs
    from quantgate.report.build import write_report

    html_file, md_file = write_report(load_runs(args.benchmark_json, args.allow_mixed_machines), _claims(args.claims),
                                      args.title, args.output)
    print(f"{html_file}\n{md_file}")
    if args.screenshot:
        from quantgate.report.browser import screenshot

        print(screenshot(html_file, Path(args.output) / "report.png", height=args.screenshot_height))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from quantgate.atomic import atomic_write_text
    from quantgate.report.compare import (
        as_text,
        compare_runs,
        exit_code,
        history_files,
        load_history,
        load_thresholds,
        nothing_to_compare,
        render,
    )
    from quantgate.report.document import to_html, to_markdown

    if args.storage:
        files = history_files(args.storage)
        if args.runs:
            raise QuantgateError("give either --storage or benchmark files, not both")
    else:
        files = [Path(p) for p in args.runs]
        if len(files) < 2:
            raise QuantgateError("compare needs two benchmark files (BASE NEW ...) or --storage DIR")
    history = load_history(files)
    (base_label, base), (new_label, new) = history[-2], history[-1]
    thresholds = load_thresholds(args.thresholds or shipped("compare.toml", "fixtures/compare.toml"))

    def fraction(percent: float | None) -> float | None:
        return None if percent is None else percent / 100

    comparison = compare_runs(base, new, tolerance=fraction(args.tolerance),
                              figure_tolerance=fraction(args.memory_tolerance), alpha=args.alpha, thresholds=thresholds,
                              allow_cross_hardware=args.allow_cross_hardware, base_label=base_label,
                              new_label=new_label)
    for label, runs in ((base_label, base), (new_label, new)):
        for stop in runs.interrupted:  # a partial run compares fewer cases; say so before the verdict
            print(f"note: {label} is partial: interrupted (Ctrl-C) in {stop.get('in_test')} after "
                  f"{stop.get('finished_tests')} tests")
    print(as_text(comparison), end="")
    if (empty := nothing_to_compare(base, new, comparison)) is not None:
        print(f"quantgate compare: {empty}", file=sys.stderr)
        return 2  # neither a pass nor a regression
    if args.output:
        doc = render(comparison, history, title=f"quantgate compare: {base_label} -> {new_label}")
        out = Path(args.output)
        atomic_write_text(out / "compare.html", to_html(doc))
        atomic_write_text(out / "compare.md", to_markdown(doc))
    return exit_code(comparison)


def _merge(args: argparse.Namespace) -> int:
    from quantgate.atomic import atomic_write_json
    from quantgate.report import merge_benchmark_json

    merged = merge_benchmark_json(args.inputs, allow_mixed_machines=args.allow_mixed_machines,
                                  allow_missing_shards=args.allow_missing_shards)
    atomic_write_json(args.output, merged)
    print(f"{args.output}: {len(merged['benchmarks'])} benchmarks from {len(args.inputs)} files")
    shards = merged["quantgate"].get("shards")
    if shards is not None:
        missing = ", ".join(f"{i}/{shards['count']}" for i in shards["missing"])
        print(f"shards of one selection: {len(shards['present'])} of {shards['count']}"
              + (f"; MISSING {missing}" if missing else ""))
    return 0


def _regate(args: argparse.Namespace) -> int:
    from quantgate.report.regate import as_text, exit_code, load_gates, recheck_run
    from quantgate.report.runs import load_benchmark_json

    book = load_gates(args.gates or shipped("gates", "fixtures/gates"))
    rows = [row for path in args.runs for row in recheck_run(str(path), load_benchmark_json(path), book)]
    print(as_text(rows, changed_only=args.changed), end="")
    return exit_code(rows)


def _golden(args: argparse.Namespace) -> int:
    import torch

    from quantgate.cases import Selection, make_case
    from quantgate.hardware import device_info, machine_facts
    from quantgate.models import get_model
    from quantgate.models.sources import SourceContext
    from quantgate.pipeline import load_pipeline
    from quantgate.plugin import default_cache_dir
    from quantgate.prompts import PromptSet
    from quantgate.quality.golden import write_golden

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_model(args.model)
    case = make_case(spec, args.source, "bf16", "eager", 1, device, Selection(models=[spec.name], schemes=["bf16"]))
    pairs = [(prompt, seed) for seed, prompt in enumerate(PromptSet.load(args.prompts).take(args.count))]
    loaded = load_pipeline(case, SourceContext(cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir()))
    entries = []
    for prompt, seed in pairs:
        entries.append((prompt, seed, loaded.generate(case, [prompt], seed=seed)[0]))
        print(f"  {len(entries)}/{len(pairs)} seed {seed}: {prompt[:60]}", file=sys.stderr)
    settings = {"scheme": "bf16", **case.call_kwargs(), "weights": loaded.source.detail}
    golden = write_golden(args.golden_dir, spec.name, args.source, settings, entries,
                          {"device": device_info(device).name, "hardware": device_info(device).hardware_class,
                           "versions": machine_facts()["libraries"]})
    print(golden.directory)
    return 0


def _env(args: argparse.Namespace) -> int:
    from quantgate.hardware import machine_facts

    print(json.dumps(machine_facts(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantgate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"quantgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each model's components")
    p.set_defaults(func=_models)

    p = sub.add_parser("schemes", help="list schemes and whether each runs on this machine")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=_schemes)

    p = sub.add_parser("materialize", help="build synthetic weights for a model ahead of a run")
    p.add_argument("model", help="a registered model (quantgate models)")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="full: the real architecture (about 34 GB for FLUX.1); tiny: CPU-sized (default: full)")
    p.add_argument("--cache-dir", help="default: $QUANTGATE_CACHE_DIR or ~/.cache/quantgate")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--device", help="where to generate the weights (default: cuda if present)")
    p.set_defaults(func=_materialize)

    p = sub.add_parser("report", help="an HTML report and its Markdown twin from benchmark JSON files")
    p.add_argument("benchmark_json", nargs="+", help="files written by pytest --benchmark-json (merged if several)")
    p.add_argument("-o", "--output", required=True, help="directory for report.html and report.md")
    p.add_argument("--title", default="quantgate report", help="the report's heading")
    p.add_argument("--claims", help="the claims' success criteria and memory budgets (default: fixtures/claims.toml)")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="merge files from different GPUs, drivers or library versions (as quantgate merge)")
    p.add_argument("--screenshot", action="store_true", help="also render report.png in headless Chromium")
    p.add_argument("--screenshot-height", type=int, default=2400, help="pixels (default: 2400)")
    p.set_defaults(func=_report)

    p = sub.add_parser("summary", help="the report's Markdown twin on standard output")
    p.add_argument("benchmark_json", nargs="+", help="files written by pytest --benchmark-json")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.add_argument("--title", default="quantgate run", help="the summary's heading")
    p.add_argument("--claims", help="the claims' success criteria and memory budgets (default: fixtures/claims.toml)")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="merge files from different GPUs, drivers or library versions (as quantgate merge)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("compare", help="compare benchmark runs across commits (Mann-Whitney U test of each case's "
                       "rounds); exit 1 on regression")
    p.add_argument("runs", nargs="*", help="benchmark JSON files, oldest first; the last two are compared")
    p.add_argument("--storage", help="a pytest-benchmark storage directory (--benchmark-storage) to read instead")
    p.add_argument("--thresholds", default=None, help="alpha and the tolerances (default: fixtures/compare.toml here, "
                   "else the one shipped with quantgate)")
    p.add_argument("--alpha", type=float, default=None,
                   help="significance level of the rank test, e.g. 0.01 (default: the thresholds file's)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="percent a median must move, significantly, to count (default: the thresholds file's)")
    p.add_argument("--memory-tolerance", type=float, default=None,
                   help="percent memory and quality figures may move (default: the thresholds file's)")
    p.add_argument("--allow-cross-hardware", action="store_true", help="compare runs from different GPU classes")
    p.add_argument("-o", "--output", help="directory for compare.html (with trend plots) and compare.md")
    p.set_defaults(func=_compare)

    p = sub.add_parser("merge", help="join benchmark JSON files of runs split over several commands")
    p.add_argument("inputs", nargs="+", help="benchmark JSON files written by quantgate runs")
    p.add_argument("-o", "--output", required=True, help="the merged file")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="merge files from different GPUs, drivers or library versions")
    p.add_argument("--allow-missing-shards", action="store_true",
                   help="merge the shards of a --quantgate-shard run even where some are missing (listed)")
    p.set_defaults(func=_merge)

    p = sub.add_parser("regate", help="re-check a run's measured values against the current gates; exit 1 on a failure")
    p.add_argument("runs", nargs="+", help="benchmark JSON files written by quantgate runs")
    p.add_argument("--gates", default=None,
                   help="a gates file or directory (default: fixtures/gates here, else the one shipped with quantgate)")
    p.add_argument("--changed", action="store_true", help="list only values whose verdict differs from the run's own")
    p.set_defaults(func=_regate)

    p = sub.add_parser("golden", help="(re)write a model's golden images from its bf16 pipeline, atomically")
    p.add_argument("model", help="a registered model (quantgate models)")
    p.add_argument("--source", default="tiny", choices=("hub", "synthetic", "tiny"), help="default: tiny")
    p.add_argument("--prompts", default="fixtures/prompts/gate.txt", help="prompt file (default: the gate set)")
    p.add_argument("--count", type=int, default=4,
                   help="images, one per prompt, seeds 0, 1, ... (default: 4, as --quantgate-quality-prompts)")
    p.add_argument("--golden-dir", default="golden_images", help="the store (default: golden_images)")
    p.add_argument("--cache-dir", help="default: $QUANTGATE_CACHE_DIR or ~/.cache/quantgate")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=_golden)

    p = sub.add_parser("env", help="print GPU, driver, CUDA and library versions as JSON")
    p.set_defaults(func=_env)

    # -- quantgate's own GPTQ W4A8 plan (calibrate, quantize, benchmark, samples) --
    from quantgate.cli_gptq import add_gptq_parser

    add_gptq_parser(sub)

    # -- evaluation mode: FID and CLIP score over a caption set --
    from quantgate.cli_eval import add_eval_parser

    add_eval_parser(sub)

    # -- plans: what one selects and how long it takes --
    from quantgate.cli_plan import add_plan_parser

    add_plan_parser(sub)

    # -- disk caches: list, clear, LRU eviction --
    from quantgate.cli_cache import add_cache_parser

    add_cache_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quantgate`` command."""
    from quantgate.safe_loading import enforce_offline

    args = build_parser().parse_args(argv)
    enforce_offline()  # the commands load weights too: offline and weights-only, as in a run
    try:
        return int(args.func(args))
    except QuantgateError as exc:
        print(f"quantgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
