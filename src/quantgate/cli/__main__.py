"""``python -m quantgate.cli``: the ``quantgate`` command."""

import sys

from quantgate.cli import main

sys.exit(main())
