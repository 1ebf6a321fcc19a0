"""`python -m nudges`: the same as the `nudges` command."""

import sys

from .cli import main

sys.exit(main())
