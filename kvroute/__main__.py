"""`python -m kvroute` = the `kvroute` command."""

import sys

from kvroute.router.cli import main

if __name__ == "__main__":  # not when re-imported as `__mp_main__` by a `serve --processes` child
    sys.exit(main())
