"""``python -m gateway`` is the same as the ``aigw`` console script."""

import sys

from gateway.cli import main

sys.exit(main())
