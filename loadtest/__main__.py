"""``python -m loadtest``: see :mod:`loadtest.run`."""

import sys

from loadtest.run import main

if __name__ == "__main__":
    sys.exit(main())
