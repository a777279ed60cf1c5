"""The ``quantgate`` command line: inspect registries, check this machine, pre-build caches.

    quantgate models                      registered models and their defaults
    quantgate schemes [--device cuda]     schemes, and whether each can run here (or why not)
    quantgate env                         GPU, driver, CUDA and library versions as JSON
    quantgate materialize MODEL ...       build a synthetic/tiny weight directory ahead of a run
    quantgate golden MODEL --source tiny  write a model's golden images from its bf16 pipeline
    quantgate report BENCH.json -o DIR    HTML report + Markdown twin (checklist, plots, recommendations)
    quantgate summary BENCH.json          the report's Markdown twin on standard output
    quantgate compare OLD.json NEW.json   rank test of each case's rounds across commits; exit 1 on a regression
    quantgate merge A.json B.json -o M    join runs split over several commands into one JSON
    quantgate regate RUN.json [--changed] a run's measured values against the current gates
    quantgate gptq calibrate|quantize|benchmark|samples MODEL
                                          the GPTQ W4A8 plan, step by step (--help on each)
    quantgate eval MODEL --captions F --reference-dir D --out O
                                          generate for a caption set, FID and CLIP score (resumable)
    quantgate plan [NAME]                 what a plan selects (fixtures/plans/) and its expected time
    quantgate cache list|clear            what the suite keeps on disk; clear by kind, age or size (LRU)
"""

# One module per command group, each with register(sub) adding its subcommands:
#   registry.py  models, schemes, env          weights.py  materialize, golden
#   report.py    report, summary, compare, merge, regate
#   gptq.py      gptq ...    eval.py  eval    plan.py  plan    cache.py  cache ...
# What the commands share with the pytest plugin (cache dir, device, resolution, calibration
# and golden settings) is quantgate.settings; nothing here imports quantgate.plugin.

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from quantgate import __version__
from quantgate.errors import QuantgateError


def build_parser() -> argparse.ArgumentParser:
    """The ``quantgate`` parser with every command group's subcommands."""
    from quantgate.cli import cache, gptq, plan, registry, report, weights
    from quantgate.cli import eval as evaluation

    parser = argparse.ArgumentParser(prog="quantgate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"quantgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (registry, weights, report, gptq, evaluation, plan, cache):
        group.register(sub)
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


__all__ = ["build_parser", "main"]
