"""`python -m router` = the `kvroute` command."""

import sys

from router.cli import main

sys.exit(main())
