# compatibility: removed when quantgate.plugin imports quantgate.results
"""The one name quantgate.plugin still imports from here; everything else is ``quantgate.results``."""

from quantgate.results.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION"]
