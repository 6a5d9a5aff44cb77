"""Logging set-up for the service entry point (libraries only add NullHandler).

Log records never carry patient data: modules refer to series by
:func:`gateway.uids.short_ref` and to jobs by id. pynetdicom's own request and
response identifier logging is switched off for the same reason, and the
libraries that narrate what they copy from the source objects (highdicom logs
each source SOP Instance UID at INFO) are held at ``[logging]
third_party_level``, WARNING by default.

Log records also never carry raw control characters. Calling AE titles, UIDs
and whatever else a peer sends end up in messages (the gateway's own and the
libraries'), and a newline in one of them would start a forged log line; an
ANSI escape would repaint the operator's terminal. Every record the configured
handler writes is escaped (:func:`escape`): ``\\n`` becomes the two characters
``\\`` ``n``, other C0 and C1 controls become ``\\xHH``, so one record is one
line whatever it quotes. Traceback lines are escaped one by one and indented,
so no continuation line can pass for the start of a record either.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["THIRD_PARTY_LOGGERS", "configure", "escape"]

#: Libraries whose INFO and DEBUG records quote what peers sent (UIDs, AE titles, PDUs).
THIRD_PARTY_LOGGERS = ("highdicom", "pydicom", "pynetdicom")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 (with ESC, so ANSI sequences lose their power), DEL, C1 (with NEL), and the
# Unicode line and paragraph separators that some viewers break lines at.
_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_TABLE = {c: _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}

#: What continuation lines of a traceback start with: never a timestamp.
_CONTINUATION = "    "


def escape(text: str) -> str:
    """Replace every control character of ``text`` with a visible escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return text.translate(_TABLE)


def _escape_block(text: str) -> str:
    """A traceback or stack, each line escaped and indented under the record's first line."""
    return "\n".join(_CONTINUATION + escape(line) for line in text.splitlines())


def _format_exception(formatter: logging.Formatter, ei: Any) -> str:
    """The traceback of ``ei``, with each exception's message on one escaped line, indented as a block.

    A traceback's own line breaks (frames, source lines) stay, but a message
    such as ``ValueError("bad UID 1.2\\n2026-01-01 ... INFO forged")`` must not
    become a line of its own: each message in the chain is escaped first.
    """
    text = formatter.formatException(ei)
    exc, seen = ei[1], set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        try:
            message = str(exc)
        except Exception:  # a broken __str__: traceback printed its own placeholder
            message = ""
        if message and escape(message) != message:
            text = text.replace(message, escape(message))
        exc = exc.__cause__ or exc.__context__
    return _escape_block(text)


class _SafeTextFormatter(logging.Formatter):
    """The text format, with the message escaped and tracebacks indented (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        out = self.formatMessage(record)
        if record.exc_info:
            out += "\n" + _format_exception(self, record.exc_info)
        elif record.exc_text:
            out += "\n" + _escape_block(record.exc_text)
        if record.stack_info:
            out += "\n" + _escape_block(self.formatStack(record.stack_info))
        return out


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; ``msg`` escaped as in the text format, for consumers that print it raw."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": escape(record.getMessage()),
        }
        if record.exc_info:
            out["exc"] = _format_exception(self, record.exc_info)
        # ensure_ascii: C1 controls and U+2028 stay \\u escapes in the line itself too.
        return json.dumps(out, ensure_ascii=True)


def configure(level: str = "INFO", fmt: str = "text", third_party_level: str = "WARNING") -> None:
    """Configure the root logger once, for the service process only.

    Parameters
    ----------
    level : str
        Level of the gateway's own loggers (``[logging] level``).
    fmt : {"text", "json"}
        ``[logging] format``.
    third_party_level : str
        Level of highdicom, pydicom and pynetdicom (``[logging] third_party_level``). Below WARNING
        they log source UIDs and association details: keep it for debugging on test data.
    """
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_SafeTextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(third_party_level)
    # pydicom reports odd values (an invalid UI, say) with warnings.warn, which would
    # reach stderr raw; through logging they are escaped like everything else.
    logging.captureWarnings(True)
