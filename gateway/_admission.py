"""Admission of C-STORE data sets while they stream to disk: no byte is written past a limit.

pynetdicom streams a C-STORE data set to a file when
``_config.STORE_RECV_CHUNKED_DATASET`` is set. ``DIMSEMessage.decode_msg``
(``pynetdicom/dimse_messages.py``) calls the module-level name
``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` once the
request's command set is complete, before any data set byte; it writes the
File Meta Information and then each P-DATA fragment with ``write(bytes)``
followed by ``file.flush()``. After the C-STORE handler returns,
``StorageServiceClass.SCP`` calls ``close()`` and unlinks ``name``. If the
association ends half-way, nobody closes or removes the file.

DIMSE sends no size ahead of a data set (PS3.7 9.3.1.1), so limits can only
be kept while it arrives. :class:`StreamAdmission` replaces that one name,
``pynetdicom.dimse_messages.NamedTemporaryFile``, while the listener runs,
with a factory of :class:`AdmittedStream`: a file object with exactly the
methods pynetdicom uses, which asks :meth:`gateway.ingest.Ingest.admit`
before the first byte and before each fragment. The moment a limit would be
crossed (``max_instance_bytes``, the ``min_free_bytes`` watermark, or the
disk is full) it removes the partial file and drops the rest of that data
set as it arrives. DIMSE gives the SCP no way to answer before the data set
is complete short of aborting, so the handler then answers the refusal,
0xA700 (PS3.4 B.2.3), on an association that stays usable; the next
C-STORE is admitted afresh. A refused data set that goes on for more than
``max_instance_bytes`` past the refusal is not read to its end: the
association is aborted (:func:`gateway.frontdoor.abort_association`), so a
sender cannot keep the listener reading for ever. When an association ends
with a data set still streaming, :meth:`StreamAdmission.discard` removes its
file at once.

This is the only change below pynetdicom's public API; it is tested in
``tests/test_disk_admission.py`` against pynetdicom's real receive path.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages

from gateway.frontdoor import abort_association
from gateway.ingest import RefusalReason, Refused
from gateway.status import AbortReason

__all__ = ["AdmittedStream", "StreamAdmission"]

log = logging.getLogger(__name__)

#: ``(written, incoming) -> Refused | None``: :meth:`gateway.ingest.Ingest.admit`.
Admit = Callable[[int, int], "Refused | None"]


class AdmittedStream:
    """The file one C-STORE data set streams into, written only while admission allows.

    Parameters
    ----------
    admit : callable
        Asked before the first byte and before each write.
    incoming : pathlib.Path
        Folder for the file (the data dir's ``incoming``, same filesystem as the store).
    suffix : str
        File name suffix, as pynetdicom asks for it.
    """

    def __init__(self, admit: Admit, incoming: Path, suffix: str = ".dcm", drop_limit: int | None = None) -> None:
        self._admit = admit
        self._drop_limit = drop_limit
        self.dropped = 0
        self.owner = threading.current_thread()  # pynetdicom's DUL thread of the association
        self.written = 0
        # One pass over the bytes: hashed as they are written, not read back for it.
        self._sha256 = hashlib.sha256()
        self.refused: Refused | None = admit(0, 0)
        self._fd: int | None = None
        if self.refused is None:
            self._fd, self.name = tempfile.mkstemp(suffix=suffix, dir=incoming)
        else:
            # No file at all: pynetdicom still needs a name; it never exists.
            self.name = str(incoming / f"refused-{uuid.uuid4().hex}{suffix}")
            log.warning("C-STORE data set refused before its first byte: %s", self.refused.detail)

    @property
    def file(self) -> AdmittedStream:
        """pynetdicom calls ``file.flush()`` after each fragment; writes here are unbuffered."""
        return self

    def write(self, data: bytes) -> int:
        """Write a fragment if admitted; otherwise drop it (the whole fragment counts as consumed)."""
        if self.refused is not None:
            # Dropped so that the C-STORE can be answered 0xA700 on a usable association;
            # past drop_limit more bytes, the association is aborted instead.
            self.dropped += len(data)
            if self._drop_limit is not None and self.dropped > self._drop_limit:
                self._drop_limit = None  # once
                abort_association(AbortReason.DATA_SET_TOO_LARGE, f"refused data set went on past {self.dropped} bytes")
            return len(data)
        refused = self._admit(self.written, len(data))
        if refused is None:
            refused = self._write(data)
        if refused is not None:
            self._refuse(refused)
        return len(data)

    @property
    def sha256(self) -> str | None:
        """SHA-256 (hex) of everything written, when the whole data set was."""
        return None if self.refused is not None else self._sha256.hexdigest()

    def _write(self, data: bytes) -> Refused | None:
        assert self._fd is not None
        self._sha256.update(data)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.written += n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Refused(RefusalReason.OUT_OF_RESOURCES, "the data dir filled while the data set was written")
            log.error("writing a received data set failed (%s)", exc.strerror)
            return Refused(RefusalReason.INTERNAL_ERROR, f"writing the received data set failed ({exc.strerror})")
        return None

    def _refuse(self, refused: Refused) -> None:
        """Stop writing: remove the partial file now and keep the refusal for the handler."""
        self.refused = refused
        self.close()
        Path(self.name).unlink(missing_ok=True)
        log.warning("C-STORE data set refused while streaming, partial file removed: %s", refused.detail)

    def flush(self) -> None:
        """Nothing is buffered (every write goes straight to the file descriptor)."""

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the file: its association ended before the data set did."""
        self.close()
        Path(self.name).unlink(missing_ok=True)


class StreamAdmission:
    """Puts :class:`AdmittedStream` into pynetdicom's chunked receive path and keeps track of open streams.

    Parameters
    ----------
    admit : callable
        :meth:`gateway.ingest.Ingest.admit`.
    incoming : pathlib.Path
        Where the streams' files go.

    Notes
    -----
    The replaced name is module-global in pynetdicom, like
    ``_config.STORE_RECV_CHUNKED_DATASET`` itself: one listener per process
    installs it (:meth:`install`) and restores what it found (:meth:`uninstall`).
    """

    def __init__(self, admit: Admit, incoming: Path, drop_limit: int | None = None) -> None:
        self._admit = admit
        self._incoming = incoming
        self._drop_limit = drop_limit
        self._open: dict[str, AdmittedStream] = {}
        self._lock = threading.Lock()
        self._saved: Any = None

    def install(self) -> None:
        self._saved = dimse_messages.NamedTemporaryFile
        dimse_messages.NamedTemporaryFile = self._new_stream  # type: ignore[assignment]

    def uninstall(self) -> None:
        if self._saved is not None:
            dimse_messages.NamedTemporaryFile = self._saved
            self._saved = None

    def _new_stream(self, *, suffix: str = ".dcm", **_ignored: Any) -> AdmittedStream:
        """The stand-in for ``NamedTemporaryFile(delete=False, mode="wb", suffix=...)``."""
        stream = AdmittedStream(self._admit, self._incoming, suffix, self._drop_limit)
        with self._lock:
            self._open[stream.name] = stream
        return stream

    def take(self, path: Path | str) -> AdmittedStream | None:
        """Hand a complete data set's file over to its handler: its stream (refusal, hash), None if unknown."""
        with self._lock:
            return self._open.pop(str(path), None)

    def discard(self, assoc: Any) -> int:
        """Remove the files of data sets still streaming on an association that ended; how many."""
        dul = getattr(assoc, "dul", None)
        with self._lock:
            gone = [s for s in self._open.values() if s.owner is dul]
            for s in gone:
                del self._open[s.name]
        for s in gone:
            s.discard()
        if gone:
            log.info("association ended mid data set: %d partial file(s) removed", len(gone))
        return len(gone)

    def streaming(self) -> int:
        """How many data sets are streaming now (for tests and diagnostics)."""
        with self._lock:
            return len(self._open)
