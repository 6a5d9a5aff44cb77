"""Progress lines for the person running ``aigw demo``."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["PROGRESS_EVERY", "Console", "secs"]

log = logging.getLogger(__name__)


#: Seconds between progress lines while waiting.
PROGRESS_EVERY = 3.0


class Console:
    """Progress lines on stderr, prefixed with the time since the demo began."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        sys.stderr.write(f"[demo {self.elapsed():6.1f} s] {message}\n")
        sys.stderr.flush()
        log.info("%s", message)


def secs(value: float | None) -> str:
    """A duration as the report and the progress lines show it ("-" where the stage did not happen)."""
    return "-" if value is None else f"{value:.1f} s"
