"""``python -m vlaflow.cli`` = the ``vlaflow`` command (torchrun and the tests start it this way)."""

import sys

from vlaflow.cli import main

sys.exit(main())
