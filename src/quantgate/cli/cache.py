"""``quantgate cache list|clear``: what the suite keeps on disk, and removing it safely.

    quantgate cache list [--what synthetic,calibration]
    quantgate cache clear [--what quantized] [--older-than 7d] [--dry-run]
    quantgate cache clear --max-size 50GiB      evict least recently used entries down to 50 GiB

The layout and the safety rules are in ``quantgate.cache``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from quantgate.settings import CACHE_DIR_HELP, cache_dir


def _root(args: argparse.Namespace) -> Path:
    return cache_dir(args.cache_dir)


def _what(args: argparse.Namespace) -> list[str] | None:
    from quantgate.cache import KINDS
    from quantgate.errors import QuantgateError

    if not args.what:
        return None
    names = [n.strip() for n in args.what.split(",") if n.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise QuantgateError(f"unknown cache kind(s) {unknown}; known: {', '.join(KINDS)}")
    return names


def _list(args: argparse.Namespace) -> int:
    from quantgate.cache import KINDS, entries
    from quantgate.units import format_age, format_size

    root = _root(args)
    found = entries(root, _what(args))
    now = time.time()
    print(f"quantgate cache at {root}")
    for kind in _what(args) or list(KINDS):
        mine = [e for e in found if e.kind == kind]
        print(f"{kind:12s} {len(mine):5d} entries {format_size(sum(e.size for e in mine)):>11s}  "
              f"{KINDS[kind].description}")
        if args.verbose:
            for e in sorted(mine, key=lambda e: e.last_used, reverse=True):
                print(f"  {format_size(e.size):>11s}  used {format_age(now - e.last_used):>4s} ago  {e.name}")
    print(f"{'total':12s} {len(found):5d} entries {format_size(sum(e.size for e in found)):>11s}")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from quantgate.cache import clear, evict
    from quantgate.errors import QuantgateError
    from quantgate.units import format_size, parse_duration, parse_size

    root = _root(args)
    what = _what(args)
    try:
        older = parse_duration(args.older_than) if args.older_than else None
        max_size = parse_size(args.max_size) if args.max_size else None
    except ValueError as exc:
        raise QuantgateError(str(exc)) from exc
    if max_size is not None:
        out = evict(root, max_size, what, dry_run=args.dry_run)
    else:
        out = clear(root, what, older, dry_run=args.dry_run)
    if args.dry_run:
        for e in out.removed:
            print(f"would remove {e.name} ({format_size(e.size)})")
        print(f"would free {format_size(out.freed)} under {root}")
        return 0
    for e in out.removed:
        print(f"removed {e.name} ({format_size(e.size)})")
    for e in out.locked:
        print(f"kept {e.name}: in use (its lock {e.lock} is held)")
    print(f"freed {format_size(out.freed)} under {root}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Register ``quantgate cache list|clear``."""
    p = sub.add_parser("cache", help="list or clear what quantgate keeps on disk",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    common.add_argument("--what", help="comma-separated kinds: synthetic, calibration, quantized, lora, inductor, "
                                       "trash (default: all)")
    q = verbs.add_parser("list", parents=[common], help="entries per kind with sizes (-v: each entry and its age)")
    q.add_argument("-v", "--verbose", action="store_true")
    q.set_defaults(func=_list)
    q = verbs.add_parser("clear", parents=[common], help="remove entries (skips those another run holds locked)")
    q.add_argument("--older-than", help="only entries unused for longer than this (e.g. 7d, 12h)")
    q.add_argument("--max-size", help="instead of clearing, evict least recently used entries down to this size "
                                      "(e.g. 50GiB)")
    q.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    q.set_defaults(func=_clear)
