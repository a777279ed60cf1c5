"""Load the quantgate pytest plugin for this repository's suite (and pytester for its own tests).

Elsewhere, enable the plugin with ``-p quantgate.plugin``.
"""

pytest_plugins = ["quantgate.plugin", "pytester"]
