"""``python -m gateway`` is the same as the ``aigw`` console script."""

import sys

from gateway.cli import main

if __name__ == "__main__":  # not when a listener process (spawn) imports this module again
    sys.exit(main())
