"""Load the quantgate pytest plugin for this repository's suite.

Elsewhere, enable it with ``-p quantgate.plugin``.
"""

pytest_plugins = ["quantgate.plugin"]
