"""``python -m vlaflow.cli ...``: the same as the ``vlaflow`` console script (a package needs this module
to run with ``-m``; the subprocess tests and machines without the console script on PATH use it)."""

import sys

from vlaflow.cli import main

sys.exit(main())
