"""`python -m fleetsim`: see fleetsim/cli.py."""

import sys

from fleetsim.cli import main

sys.exit(main())
