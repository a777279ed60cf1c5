"""Fixtures shared by the harness's own tests (tests/unit)."""

from pathlib import Path

import pytest

from quantgate.models import get_model
from quantgate.models.synthetic import materialize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quantgate cache directory private to this test session."""
    return tmp_path_factory.mktemp("quantgate-cache")


@pytest.fixture(scope="session")
def tiny_flux_dir(tiny_cache: Path) -> Path:
    """The tiny FLUX.1-schnell pipeline directory (built once per session)."""
    return materialize(get_model("flux-schnell"), "tiny", tiny_cache, progress=False)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tiny_cache: Path) -> Path:
    """The tiny SD3.5 Medium pipeline directory (built once per session)."""
    return materialize(get_model("sd35-medium"), "tiny", tiny_cache, progress=False)
