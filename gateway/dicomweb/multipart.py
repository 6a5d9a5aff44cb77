"""An incremental ``multipart/related`` parser for STOW-RS request bodies.

PS3.18 10.5.1 carries the instances of a Store Instances request as the
parts of a ``multipart/related`` body (RFC 2387, framed as in RFC 2046
5.1.1). The body arrives over the network in chunks of any size, and one
part may be a gigabyte, so the parser is push style and keeps at most one
delimiter's length of a part's content back: :meth:`MultipartParser.feed`
takes whatever bytes came and returns events (a part's headers, a piece of
its content, its end) that the caller writes straight to disk. A delimiter
split across two chunks is still found, because the bytes that could start
one are held until the next chunk says whether they do.

Framing per RFC 2046 5.1.1: an optional preamble, then for each part
``--boundary``, optional transport padding (spaces, tabs), CRLF, header
lines, an empty line and the content; the content ends at
``CRLF--boundary``, and ``--boundary--`` closes the body (an epilogue
after it is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

__all__ = ["MultipartError", "MultipartParser", "PartData", "PartEnd", "PartStart"]

#: Longest boundary accepted (RFC 2046 5.1.1 says 70; be liberal in what is accepted).
MAX_BOUNDARY_BYTES = 256
#: Longest header block of one part: a STOW part needs only Content-Type.
MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body is not a well-formed multipart body; the message says where it went wrong."""


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` maps lower-case field names to values (RFC 5322 syntax)."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """A piece of the current part's content, in order."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part's content is complete (its closing delimiter was seen)."""


Event: TypeAlias = PartStart | PartData | PartEnd


class _State(Enum):
    PREAMBLE = "preamble"
    AFTER_DELIMITER = "after delimiter"
    HEADERS = "headers"
    CONTENT = "content"
    EPILOGUE = "epilogue"


class MultipartParser:
    """Split a multipart body fed in chunks into part events.

    Parameters
    ----------
    boundary : bytes
        The ``boundary`` parameter of the request's Content-Type.

    Raises
    ------
    MultipartError
        When the boundary is empty or longer than :data:`MAX_BOUNDARY_BYTES`.
    """

    def __init__(self, boundary: bytes) -> None:
        # RFC 2046 allows 70 characters; some clients send more (Orthanc: two UUIDs),
        # so accept up to a bound that still keeps the held-back tail small.
        if not 1 <= len(boundary) <= MAX_BOUNDARY_BYTES:
            raise MultipartError(f"boundary must be 1 to {MAX_BOUNDARY_BYTES} characters")
        # Every delimiter is CRLF "--" boundary; the first may start the body,
        # so the body is read as if a CRLF came before it.
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")
        self._state = _State.PREAMBLE
        self.parts = 0

    @property
    def done(self) -> bool:
        """Whether the closing delimiter has been seen."""
        return self._state is _State.EPILOGUE

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes of the body; return the events they complete.

        Raises
        ------
        MultipartError
            When the bytes cannot continue a well-formed body.
        """
        if self._state is _State.EPILOGUE:
            return []  # RFC 2046: an epilogue is ignored
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """Check the body ended where a multipart body may end.

        Raises
        ------
        MultipartError
            When the body stopped before its closing delimiter.
        """
        if self._state is not _State.EPILOGUE:
            where = f"in part {self.parts}" if self.parts else "before the first part"
            raise MultipartError(f"body ended {where}, without the closing delimiter")

    # ------------------------------------------------------------ internals
    def _step(self, events: list[Event]) -> bool:
        """Advance one state transition if the buffer allows; whether it did."""
        buf = self._buf
        dlen = len(self._delimiter)
        if self._state is _State.PREAMBLE:
            i = buf.find(self._delimiter)
            if i < 0:
                del buf[: max(0, len(buf) - dlen + 1)]  # preamble: discarded
                return False
            del buf[: i + dlen]
            self._state = _State.AFTER_DELIMITER
            return True
        if self._state is _State.AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = _State.EPILOGUE
                buf.clear()
                return False
            j = 0
            while j < len(buf) and buf[j] in b" \t":  # transport padding
                j += 1
            if j > 256:
                raise MultipartError("too much transport padding after a delimiter")
            if len(buf) - j < 2:
                return False
            if buf[j : j + 2] != b"\r\n":
                raise MultipartError("a delimiter must be followed by CRLF or '--'")
            del buf[: j + 2]
            self._state = _State.HEADERS
            return True
        if self._state is _State.HEADERS:
            if buf[:2] == b"\r\n":  # no header fields at all
                block, consumed = b"", 2
            else:
                k = buf.find(b"\r\n\r\n")
                if k < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
                    return False
                block, consumed = bytes(buf[:k]), k + 4
            if consumed > MAX_HEADER_BYTES:
                raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
            del buf[:consumed]
            self.parts += 1
            events.append(PartStart(_parse_headers(block)))
            self._state = _State.CONTENT
            return True
        if self._state is _State.CONTENT:
            i = buf.find(self._delimiter)
            if i >= 0:
                if i:
                    events.append(PartData(bytes(buf[:i])))
                events.append(PartEnd())
                del buf[: i + dlen]
                self._state = _State.AFTER_DELIMITER
                return True
            # Hold back what could be the start of a delimiter cut by the chunk edge.
            keep = dlen - 1
            if len(buf) > keep:
                events.append(PartData(bytes(buf[: len(buf) - keep])))
                del buf[: len(buf) - keep]
            return False
        return False


def _parse_headers(block: bytes) -> dict[str, str]:
    """Header fields of one part (RFC 5322 2.2; obsolete folding unfolded), names in lower case."""
    headers: dict[str, str] = {}
    name = ""
    for raw in block.decode("latin-1").split("\r\n"):
        if raw[:1] in (" ", "\t") and name:
            headers[name] += " " + raw.strip()
            continue
        field, sep, value = raw.partition(":")
        if not sep or not field.strip():
            raise MultipartError("malformed part header line")
        name = field.strip().lower()
        headers[name] = value.strip()
    return headers
