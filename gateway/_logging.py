"""Logging set-up for the service entry point (libraries only add NullHandler).

Log records never carry patient data: modules refer to series by
:func:`gateway.uids.short_ref` and to jobs by id. pynetdicom's own request and
response identifier logging is switched off for the same reason.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, for the service process only."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom's INFO level narrates every association; keep it for debugging.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
