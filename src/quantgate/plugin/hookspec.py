"""Hooks quantgate's sub-plugins implement, declared once (as pytest-benchmark's ``hookspec.py``).

The main plugin builds the JSON's ``quantgate`` section when pytest-benchmark writes its JSON
and then calls ``pytest_quantgate_json_section``: each sub-plugin adds its own keys there,
instead of every one implementing ``pytest_benchmark_update_json`` and relying on hook order.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_quantgate_json_section(config: pytest.Config, section: dict[str, Any], output_json: dict[str, Any]) -> None:
    """Add to the JSON's ``quantgate`` ``section`` (already holding the main plugin's keys).

    ``output_json`` is the whole document pytest-benchmark is about to write, for a sub-plugin
    that must also rewrite a field outside the section (xdist's node ids in ``benchmarks``).
    """
