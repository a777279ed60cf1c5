"""The sub-plugin that makes a run offline and weights-only from its start (``quantgate.safe_loading``)."""

from __future__ import annotations

import pytest

from quantgate.safe_loading import enforce_offline


def pytest_configure(config: pytest.Config) -> None:
    enforce_offline()
