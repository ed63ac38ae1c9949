"""``python -m prumerge``: the same as the ``prumerge`` command."""

import sys

from prumerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
