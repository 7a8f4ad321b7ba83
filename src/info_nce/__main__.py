"""`python -m info_nce` runs the command line."""

import sys

from info_nce.cli.__main__ import main

sys.exit(main())
