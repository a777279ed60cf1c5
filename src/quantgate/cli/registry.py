"""``quantgate models``, ``schemes`` and ``env``: the registries, and what this machine can run.

    quantgate models [-v]                 registered models and their defaults (-v: components)
    quantgate schemes [--device cuda]     schemes, and whether each can run here (or why not)
    quantgate env                         GPU, driver, CUDA and library versions as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from quantgate.settings import default_device


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

    device = default_device(args.device)
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


def _env(args: argparse.Namespace) -> int:
    from quantgate.hardware import machine_facts

    print(json.dumps(machine_facts(), indent=2))
    return 0


def register(sub: Any) -> None:
    """Register ``models``, ``schemes`` and ``env`` on the main parser's subcommands."""
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each model's components")
    p.set_defaults(func=_models)

    p = sub.add_parser("schemes", help="list schemes and whether each runs on this machine")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=_schemes)

    p = sub.add_parser("env", help="print GPU, driver, CUDA and library versions as JSON")
    p.set_defaults(func=_env)
