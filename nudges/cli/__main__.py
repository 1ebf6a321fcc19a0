"""`python -m nudges.cli`: the same as the `nudges` command."""

import sys

from . import main

sys.exit(main())
