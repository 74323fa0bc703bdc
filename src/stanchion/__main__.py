"""``python -m stanchion`` runs the command line."""

import sys

from stanchion.cli import main

sys.exit(main())
