"""The element structure of a received file, checked before success: what is acknowledged must read back.

:func:`check_structure` walks a Part 10 file's element headers, as PS3.5
section 7 defines them, in the encoding its transfer syntax names (PS3.5
section 10 and Annex A): implicit VR little endian, explicit VR little or
big endian, deflated explicit VR little endian (inflated as a stream, with a
bound), and encapsulated pixel data (PS3.5 A.4). It reads only headers and a
few small values that size the pixel data, and seeks over every other value,
so its cost grows with the number of elements, not with their size. It
checks, at every nesting level:

* tags ascend strictly within a data set or item (PS3.5 7.1: "Data Elements
  in a Data Set shall be ordered by increasing Data Element Tag Number and
  shall occur at most once"); this also catches a data set encoded in
  another VR encoding than its transfer syntax says, whose misread headers
  never keep ascending;
* an explicit VR is one of PS3.5 Table 6.2-1;
* a defined length stays within the bytes received and within the item or
  sequence that holds it; an undefined length is allowed only where PS3.5
  7.1.2, 7.5 and A.4 allow it (SQ, UN, encapsulated OB/OW) and is closed by
  its delimiter (PS3.5 7.5.1, 7.5.2);
* a sequence holds only items (PS3.5 7.5), fragments only items with a
  defined length (PS3.5 A.4);
* sequences nest at most :data:`MAX_SEQUENCE_DEPTH` deep. PS3.5 sets no
  bound; real objects stay far below it (a few levels in SR and RT), while
  thousands of levels exhaust a recursive reader (pydicom raises
  ``RecursionError``);
* native Pixel Data holds at least Rows x Columns x Samples per Pixel x
  Number of Frames x Bits Allocated / 8 bytes (PS3.5 8.1.1, PS3.3
  C.7.6.3.1.2 for YBR_FULL_422), and encapsulated Pixel Data ends in a
  Sequence Delimitation Item;
* a deflated data set is one whole deflate stream (PS3.5 A.5).

Anything else raises :class:`MalformedDataSet`, whose message names the
problem and the tag, never a value, so it is safe to log and return.

Where PS3.5 allows it and readers accept it, the walk is lenient: odd value
lengths, the reserved bytes of a long explicit VR header, and, inside an
undefined-length UN element (PS3.5 6.2.2: implicit VR little endian), items
encoded in explicit VR, as pydicom reads them.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

from pydicom.datadict import dictionary_VR

__all__ = ["MAX_SEQUENCE_DEPTH", "FileMeta", "MalformedDataSet", "check_structure", "read_file_meta"]

#: Deepest nesting of sequences accepted (see the module docstring).
MAX_SEQUENCE_DEPTH = 32

# Transfer syntaxes whose data set is deflated (PS3.5 A.5, A.7); the rest of
# those ingest accepts are explicit VR little endian apart from these two.
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"})

#: Explicit VRs (PS3.5 Table 6.2-1) and those with a 4-byte length field (PS3.5 7.1.2).
_VRS = frozenset(
    vr.encode()
    for vr in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    ).split()
)
_LONG_VRS = frozenset(vr.encode() for vr in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_META_MAX = 1 << 16  # a File Meta Information group is a few hundred bytes
_PIXEL_DATA = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double Float Pixel Data
# Top-level attributes that size native pixel data (PS3.3 C.7.6.3), read when small.
_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS = (
    0x00280002,
    0x00280004,
    0x00280008,
    0x00280010,
    0x00280011,
    0x00280100,
)
_SIZING = frozenset({_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS})
_CHUNK = 1 << 16


class MalformedDataSet(ValueError):
    """The file's structure would not read back; the message names the problem, never a value."""


def _order(little: bool) -> Literal["little", "big"]:
    return "little" if little else "big"


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class FileMeta:
    """What the File Meta Information says about the data set that follows it (PS3.10 7.1).

    Attributes
    ----------
    transfer_syntax : str
        (0002,0010) Transfer Syntax UID, trailing padding removed.
    data_set_offset : int
        Where the data set starts in the file.
    size : int
        The file's size in bytes.
    """

    transfer_syntax: str
    data_set_offset: int
    size: int


def read_file_meta(path: Path) -> FileMeta:
    """Read a Part 10 file's preamble and File Meta Information group (explicit VR little endian, PS3.10 7.1).

    Raises
    ------
    MalformedDataSet
        No ``DICM`` prefix, a meta element that runs past the file, or no
        Transfer Syntax UID.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if fh.read(132)[128:] != b"DICM":
            raise MalformedDataSet("no DICOM File Meta Information (the 'DICM' prefix is missing)")
        pos, ts = 132, None
        # Like pydicom, the group ends at the first tag outside group 0002.
        while True:
            head = fh.read(8)
            if len(head) < 8 or int.from_bytes(head[:2], "little") != 0x0002:
                break
            tag = 0x00020000 | int.from_bytes(head[2:4], "little")
            if head[4:6] in _LONG_VRS:
                ext = fh.read(4)
                length, hdr = int.from_bytes(ext, "little"), 12
            else:
                length, hdr = int.from_bytes(head[6:8], "little"), 8
            if pos + hdr + length > min(size, 132 + _META_MAX):
                raise MalformedDataSet(f"File Meta Information element {_tag(tag)} runs past the end of the data")
            value = fh.read(length)
            if tag == 0x00020010:
                ts = value.rstrip(b"\0 ").decode("ascii", "replace")
            pos += hdr + length
        if not ts:
            raise MalformedDataSet("File Meta Information has no Transfer Syntax UID (0002,0010)")
        return FileMeta(ts, pos, size)


class _Source:
    """Data set bytes read at a position, by ``pread`` on a file: headers are read, values seeked over."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self.pos = start
        self.end: int | None = end  # None: not known in advance (a deflate stream)
        self._buf = b""
        self._buf_at = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes at the position (fewer only at the end), and advance."""
        off = self.pos - self._buf_at
        if off < 0 or off + n > len(self._buf):
            # A small window: element headers are usually adjacent; one pread serves many.
            self._buf, self._buf_at, off = os.pread(self._fd, max(n, 1024), self.pos), self.pos, 0
        data = self._buf[off : off + n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Seek ``n`` bytes on; False if the data ends first."""
        assert self.end is not None
        if self.pos + n > self.end:
            return False
        self.pos += n
        return True

    def finished(self) -> bool:
        """Whether nothing but the end follows (for a deflate stream: it ended cleanly)."""
        return True


class _Inflated(_Source):
    """A deflated data set (PS3.5 A.5), inflated as a stream in chunks, never held whole.

    ``limit`` bounds the inflated size, so a small compressed upload cannot
    make the walk inflate gigabytes (deflate reaches about 1000:1).
    """

    def __init__(self, fd: int, start: int, limit: int) -> None:
        super().__init__(fd, 0, 0)
        self.end = None
        self._fd_pos = start
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending = b""
        self._limit = limit
        self._produced = 0

    def _more(self, want: int) -> bytes:
        """Inflate up to ``want`` more bytes; b"" at the end of the stream or the input."""
        while True:
            if self._z.eof:
                return b""  # what follows the stream (unused_data) is not part of the data set
            if self._z.unconsumed_tail:
                chunk = self._z.decompress(self._z.unconsumed_tail, want)
            else:
                raw = os.pread(self._fd, _CHUNK, self._fd_pos)
                if not raw:
                    return b""
                self._fd_pos += len(raw)
                try:
                    chunk = self._z.decompress(raw, want)
                except zlib.error:
                    raise MalformedDataSet("deflated data set is not a valid deflate stream") from None
            if chunk:
                self._produced += len(chunk)
                if self._produced > self._limit:
                    raise MalformedDataSet(f"deflated data set inflates to more than {self._limit} bytes")
                return chunk

    def read(self, n: int) -> bytes:
        while len(self._pending) < n:
            chunk = self._more(max(n - len(self._pending), _CHUNK))
            if not chunk:
                break
            self._pending += chunk
        data, self._pending = self._pending[:n], self._pending[n:]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        while n > 0:
            if not self._pending:
                self._pending = self._more(min(n, _CHUNK))
                if not self._pending:
                    return False
            step = min(n, len(self._pending))
            self._pending = self._pending[step:]
            self.pos += step
            n -= step
        return True

    def finished(self) -> bool:
        return not self._pending and not self._more(1) and self._z.eof


class _Kind(Enum):
    DATA_SET = "data set"
    ITEM = "item"
    SEQUENCE = "sequence"
    FRAGMENTS = "encapsulated pixel data"


@dataclass
class _Level:
    """One open nesting level: the data set, an item, a sequence or a run of fragments."""

    kind: _Kind
    end: int | None  # absolute end of a defined length; None while undefined (ends at a delimiter)
    implicit: bool
    little: bool
    tag: int = 0  # the element that opened it, for messages
    last: int = -1  # the last tag seen in it (ascending order)
    lenient: bool = False  # inside undefined-length UN: items may be explicit VR (see the module docstring)
    sizing: dict[int, bytes] = field(default_factory=dict)


def check_structure(
    path: Path, meta: FileMeta, *, max_inflated_bytes: int, max_depth: int = MAX_SEQUENCE_DEPTH
) -> None:
    """Walk the data set's element structure; raise :class:`MalformedDataSet` where it would not read back.

    Parameters
    ----------
    path : pathlib.Path
        A Part 10 file.
    meta : FileMeta
        Its File Meta Information (:func:`read_file_meta`).
    max_inflated_bytes : int
        For a deflated data set, the most bytes it may inflate to.
    max_depth : int
        The deepest nesting of sequences accepted.
    """
    ts = meta.transfer_syntax
    with open(path, "rb") as fh:
        fd = fh.fileno()
        src: _Source
        if ts in _DEFLATED:
            src = _Inflated(fd, meta.data_set_offset, max_inflated_bytes)
        else:
            src = _Source(fd, meta.data_set_offset, meta.size)
        _walk(src, implicit=ts == _IMPLICIT_LE, little=ts != _EXPLICIT_BE, max_depth=max_depth)


def _walk(src: _Source, *, implicit: bool, little: bool, max_depth: int) -> None:
    """The walk itself: iterative (an explicit stack of levels), so no depth can exhaust Python's stack."""
    top = _Level(_Kind.DATA_SET, src.end, implicit, little)
    stack = [top]
    depth = 0  # open sequences
    while True:
        lvl = stack[-1]
        if lvl.end is not None and src.pos >= lvl.end and lvl is not top:
            if src.pos > lvl.end:  # an element header crossed the end of a defined-length item or sequence
                raise MalformedDataSet(f"an element crosses the end of the {lvl.kind.value} of {_tag(lvl.tag)}")
            if lvl.kind is _Kind.SEQUENCE:
                depth -= 1
            stack.pop()
            continue
        head = src.read(8)
        if not head and lvl is top:
            if not src.finished():
                raise MalformedDataSet("deflated data set continues after its last element or is not whole")
            return
        if len(head) < 8:
            where = "a data set" if lvl is top else f"the {lvl.kind.value} of {_tag(lvl.tag)}"
            raise MalformedDataSet(f"data set is truncated inside {where}")
        order = _order(lvl.little)
        tag = int.from_bytes(head[:2], order) << 16 | int.from_bytes(head[2:4], order)

        if lvl.kind is _Kind.SEQUENCE or lvl.kind is _Kind.FRAGMENTS:
            length = int.from_bytes(head[4:8], order)
            if tag == _SEQUENCE_END and lvl.end is None:
                if length != 0:
                    raise MalformedDataSet(f"sequence delimiter of {_tag(lvl.tag)} has a non-zero length")
                if lvl.kind is _Kind.SEQUENCE:
                    depth -= 1
                stack.pop()
                continue
            if tag != _ITEM:
                raise MalformedDataSet(f"{lvl.kind.value} {_tag(lvl.tag)} holds {_tag(tag)} where an item must be")
            if lvl.kind is _Kind.FRAGMENTS:
                if length == _UNDEFINED or not src.skip(length):
                    raise MalformedDataSet(f"a fragment of {_tag(lvl.tag)} runs past the end of the data")
                continue
            end = None if length == _UNDEFINED else _within(src, stack, length, lvl.tag)
            item_implicit = lvl.implicit
            if lvl.lenient:
                item_implicit = _looks_implicit(src, lvl.little)
            stack.append(_Level(_Kind.ITEM, end, item_implicit, lvl.little, lvl.tag, lenient=lvl.lenient))
            continue

        # A data set or an item: data elements.
        if tag == _ITEM_END and lvl.kind is _Kind.ITEM and lvl.end is None:
            if int.from_bytes(head[4:8], order) != 0:
                raise MalformedDataSet(f"item delimiter in {_tag(lvl.tag)} has a non-zero length")
            stack.pop()
            continue
        if tag >> 16 == 0xFFFE:
            raise MalformedDataSet(f"item or delimiter tag {_tag(tag)} outside a sequence")
        if tag <= lvl.last:
            raise MalformedDataSet(f"element {_tag(tag)} out of ascending tag order (or repeated)")
        lvl.last = tag
        vr: bytes | None
        if lvl.implicit:
            vr, length = None, int.from_bytes(head[4:8], order)
        else:
            vr = head[4:6]
            if vr not in _VRS:
                raise MalformedDataSet(f"element {_tag(tag)} has an invalid VR for explicit VR encoding")
            if vr in _LONG_VRS:
                ext = src.read(4)
                if len(ext) < 4:
                    raise MalformedDataSet(f"data set is truncated in the header of {_tag(tag)}")
                length = int.from_bytes(ext, order)
            else:
                length = int.from_bytes(head[6:8], order)

        if length == _UNDEFINED:
            kind, lenient, sub_implicit, sub_little = _undefined(tag, vr, src, lvl)
            if kind is _Kind.SEQUENCE:
                depth += 1
                if depth > max_depth:
                    raise MalformedDataSet(f"sequences nest deeper than {max_depth} levels")
            stack.append(_Level(kind, None, sub_implicit, sub_little, tag, lenient=lenient))
            continue
        if vr == b"SQ" or (vr is None and _dictionary_sq(tag)):
            end = _within(src, stack, length, tag)
            depth += 1
            if depth > max_depth:
                raise MalformedDataSet(f"sequences nest deeper than {max_depth} levels")
            stack.append(_Level(_Kind.SEQUENCE, end, lvl.implicit, lvl.little, tag))
            continue
        if lvl is top and tag in _SIZING and length <= 64:
            lvl.sizing[tag] = src.read(length)
            if len(lvl.sizing[tag]) < length:
                raise MalformedDataSet(f"value of {_tag(tag)} runs past the end of the data")
            continue
        if lvl is top and tag in _PIXEL_DATA:
            expected = _expected_pixel_bytes(lvl.sizing, lvl.little)
            if expected is not None and length < expected:
                raise MalformedDataSet(f"pixel data {_tag(tag)} is shorter than Rows, Columns and frames need")
        _within(src, stack, length, tag)
        if not src.skip(length):
            raise MalformedDataSet(f"value of {_tag(tag)} runs past the end of the data")


def _within(src: _Source, stack: list[_Level], length: int, tag: int) -> int:
    """The end of a defined-length value at the position, checked against every enclosing length and the data."""
    end = src.pos + length
    for outer in stack:
        if outer.end is not None and end > outer.end:
            raise MalformedDataSet(f"value of {_tag(tag)} runs past the end of the data or of its container")
    return end


def _undefined(tag: int, vr: bytes | None, src: _Source, lvl: _Level) -> tuple[_Kind, bool, bool, bool]:
    """What an undefined-length element opens: (kind, lenient, implicit, little) of the new level.

    PS3.5 7.1.2: only SQ, UN and encapsulated OB/OW may have an undefined
    length; UN holds a sequence encoded in implicit VR little endian (PS3.5
    6.2.2). In implicit VR the kind is taken from the data dictionary, or
    from a first item, as pydicom reads it.
    """
    if vr == b"SQ":
        return _Kind.SEQUENCE, False, lvl.implicit, lvl.little
    if vr == b"UN":
        return _Kind.SEQUENCE, True, True, True
    if vr in (b"OB", b"OW"):
        return _Kind.FRAGMENTS, False, lvl.implicit, lvl.little
    if vr is not None:
        raise MalformedDataSet(f"element {_tag(tag)} has an undefined length, which its VR does not allow")
    if tag in _PIXEL_DATA:
        return _Kind.FRAGMENTS, False, lvl.implicit, lvl.little
    if _dictionary_sq(tag) or _peek_is_item(src, lvl.little):
        return _Kind.SEQUENCE, False, lvl.implicit, lvl.little
    raise MalformedDataSet(f"element {_tag(tag)} has an undefined length but holds no items")


def _dictionary_sq(tag: int) -> bool:
    """Whether the public data dictionary says the (implicit VR) element is a sequence."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def _peek(src: _Source, n: int) -> bytes:
    at = src.pos
    data = src.read(n)
    if isinstance(src, _Inflated):
        src._pending = data + src._pending
    src.pos = at
    return data


def _peek_is_item(src: _Source, little: bool) -> bool:
    head = _peek(src, 4)
    order = _order(little)
    return len(head) == 4 and (int.from_bytes(head[:2], order) << 16 | int.from_bytes(head[2:4], order)) == _ITEM


def _looks_implicit(src: _Source, little: bool) -> bool:
    """For an item inside undefined-length UN: implicit VR unless its first element has an explicit VR."""
    head = _peek(src, 8)
    return len(head) < 8 or head[4:6] not in _VRS or head[:4] == b"\xfe\xff\x0d\xe0"


def _expected_pixel_bytes(sizing: dict[int, bytes], little: bool) -> int | None:
    """The native pixel data size the image attributes call for (as pydicom computes it), None if unknown."""
    order = _order(little)

    def us(tag: int) -> int | None:
        raw = sizing.get(tag)
        return int.from_bytes(raw, order) if raw is not None and len(raw) == 2 else None

    rows, columns, bits = us(_ROWS), us(_COLUMNS), us(_BITS)
    samples = us(_SAMPLES) if _SAMPLES in sizing else 1
    if rows is None or columns is None or bits is None or samples is None:
        return None
    frames = 1
    if _FRAMES in sizing:
        text = sizing[_FRAMES].decode("ascii", "replace").strip(" \0")
        if not text.lstrip("+-").isdigit():
            return None
        frames = max(int(text), 1)
    count = rows * columns * samples * frames
    size = (count + 7) // 8 if bits == 1 else count * (bits // 8)
    if sizing.get(_PHOTOMETRIC, b"").strip(b" \0") == b"YBR_FULL_422":
        size = size // 3 * 2  # PS3.3 C.7.6.3.1.2: two samples per pixel, shared chrominance
    return size
