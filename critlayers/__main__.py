"""``python -m critlayers``: the command line (see :mod:`critlayers.cli`)."""

import sys

from .cli import main

sys.exit(main())
