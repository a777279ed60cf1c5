"""``quantgate materialize`` and ``golden``: weights and reference images built ahead of a run.

    quantgate materialize MODEL [--size tiny]   a synthetic (or tiny) weight directory in the cache
    quantgate golden MODEL --source tiny        a model's golden images from its bf16 pipeline

Both use the cache directory, the device and the golden settings of a pytest run
(``quantgate.settings``), so the plugin finds what they wrote.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from quantgate.settings import CACHE_DIR_HELP, cache_dir, default_device, golden_settings


def _materialize(args: argparse.Namespace) -> int:
    from quantgate.models import get_model
    from quantgate.models.synthetic import materialize

    path = materialize(get_model(args.model), args.size, cache_dir(args.cache_dir), seed=args.seed, device=args.device)
    print(path)
    return 0


def _golden(args: argparse.Namespace) -> int:
    from quantgate.cases import Selection, make_case
    from quantgate.hardware import device_info, machine_facts
    from quantgate.models import get_model
    from quantgate.models.sources import SourceContext
    from quantgate.pipeline import load_pipeline
    from quantgate.prompts import PromptSet
    from quantgate.quality.golden import write_golden

    device = default_device(args.device)
    spec = get_model(args.model)
    case = make_case(spec, args.source, "bf16", "eager", 1, device, Selection(models=[spec.name], schemes=["bf16"]))
    pairs = [(prompt, seed) for seed, prompt in enumerate(PromptSet.load(args.prompts).take(args.count))]
    loaded = load_pipeline(case, SourceContext(cache_dir=cache_dir(args.cache_dir)))
    entries = []
    for prompt, seed in pairs:
        entries.append((prompt, seed, loaded.generate(case, [prompt], seed=seed)[0]))
        print(f"  {len(entries)}/{len(pairs)} seed {seed}: {prompt[:60]}", file=sys.stderr)
    golden = write_golden(args.golden_dir, spec.name, args.source, golden_settings(case, loaded.source.detail), entries,
                          {"device": device_info(device).name, "hardware": device_info(device).hardware_class,
                           "versions": machine_facts()["libraries"]})
    print(golden.directory)
    return 0


def register(sub: Any) -> None:
    """Register ``materialize`` and ``golden`` on the main parser's subcommands."""
    p = sub.add_parser("materialize", help="build synthetic weights for a model ahead of a run")
    p.add_argument("model", help="a registered model (quantgate models)")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="full: the real architecture (about 34 GB for FLUX.1); tiny: CPU-sized (default: full)")
    p.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--device", help="where to generate the weights (default: cuda if present)")
    p.set_defaults(func=_materialize)

    p = sub.add_parser("golden", help="(re)write a model's golden images from its bf16 pipeline, atomically")
    p.add_argument("model", help="a registered model (quantgate models)")
    p.add_argument("--source", default="tiny", choices=("hub", "synthetic", "tiny"), help="default: tiny")
    p.add_argument("--prompts", default="fixtures/prompts/gate.txt", help="prompt file (default: the gate set)")
    p.add_argument("--count", type=int, default=4,
                   help="images, one per prompt, seeds 0, 1, ... (default: 4, as --quantgate-quality-prompts)")
    p.add_argument("--golden-dir", default="golden_images", help="the store (default: golden_images)")
    p.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=_golden)
