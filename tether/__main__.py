"""`python -m tether ...`: the `tether` command (tether.server.cli), for environments without its script."""

import sys

from tether.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
