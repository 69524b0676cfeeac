"""`python -m tether ...`: the `tether` command (tether/cli.py), for environments without its script."""

import sys

from tether.cli import main

if __name__ == "__main__":
    sys.exit(main())
