"""Benchmarks of the InfoNCE loss: a script form of `info-nce bench`.

Run from the repository root (after `make setup`):

    .venv/bin/python benchmarks/bench.py            # all configurations
    .venv/bin/python benchmarks/bench.py C2 C5      # some of them
    .venv/bin/python benchmarks/bench.py --help

Each (configuration, implementation) pair runs in a fresh process; see
docs/benchmarks.md for the results and the machine they came from.
"""

import sys

from info_nce.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
