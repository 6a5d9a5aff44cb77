"""``DEMO_PACS``, the node the gateway sends its results to: a real Orthanc, or a built-in Storage SCP.

Either way each received instance is filed bit-exact as
``<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` with its arrival time, and
:class:`Pacs` is what the rest of the demo asks ("has this SOP instance
arrived?").
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from gateway.status import StorageStatus
from gateway.uids import InvalidUID, checked_uid

if TYPE_CHECKING:
    from gateway.apps.viewer import Orthanc

__all__ = ["PACS_AE", "OrthancNode", "Pacs", "Received", "ReceivingNode"]

log = logging.getLogger(__name__)


PACS_AE = "DEMO_PACS"


@dataclass(frozen=True)
class Received:
    """One instance DEMO_PACS stored."""

    sop_instance_uid: str
    series_uid: str
    path: Path
    at: float


def _file_received(root: Path, data: bytes | Path) -> Received:
    """File one received instance (bytes, or a file to copy) as ``<root>/<series>/<sop>.dcm``, atomically."""
    ds = dcmread(data if isinstance(data, Path) else io.BytesIO(data), stop_before_pixels=True)
    series = checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop = checked_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    final = root / series / f"{sop}.dcm"
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(f".{final.name}.part")
    if isinstance(data, Path):
        shutil.copyfile(data, part)
    else:
        part.write_bytes(data)
    os.replace(part, final)
    return Received(sop, series, final, time.time())


class ReceivingNode:
    """``DEMO_PACS``: a Storage SCP on loopback that files what it receives.

    Each instance is written bit-exact to ``<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
    and its arrival time is recorded.

    Parameters
    ----------
    root : Path
        Folder for received instances.
    ae_title : str
        The node's AE title.
    """

    def __init__(self, root: Path, ae_title: str = PACS_AE) -> None:
        self.root = root
        self.ae_title = ae_title
        self.port: int | None = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._received: dict[str, Received] = {}

    def start(self) -> int:
        """Listen on a free loopback port (non-blocking); returns the port."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]

        self.root.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        # Every storage SOP class a gateway may send results in: the limit of
        # 128 presentation contexts binds a requestor only (PS3.8 9.3.2.2).
        for uid in _STORAGE_CLASSES.values():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])
        log.info("%s listening on 127.0.0.1:%d", self.ae_title, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def get(self, sop_instance_uid: str) -> Received | None:
        with self._lock:
            return self._received.get(sop_instance_uid)

    def count(self) -> int:
        with self._lock:
            return len(self._received)

    def _on_store(self, event: Any) -> int:
        try:
            self._store(event)
            return int(StorageStatus.SUCCESS)
        except InvalidUID as exc:
            log.warning("%s refused an instance: %s", self.ae_title, exc)
            return int(StorageStatus.CANNOT_DECODE)
        except (InvalidDicomError, EOFError, ValueError, KeyError, AttributeError) as exc:
            log.warning("%s refused an instance it cannot decode (%s)", self.ae_title, type(exc).__name__)
            return int(StorageStatus.CANNOT_DECODE)
        except Exception:
            # PS3.7 C.4.2: still a failure status, never a dropped association.
            log.exception("%s failed to store an instance", self.ae_title)
            return int(StorageStatus.UNEXPECTED_ERROR)

    def _store(self, event: Any) -> None:
        # The gateway in this process switches pynetdicom to streaming received
        # data sets to a temporary file (a process-wide setting), so both forms
        # of a C-STORE request arrive here.
        try:
            src = event.dataset_path
        except AttributeError:
            src = None
        if isinstance(src, Path):
            got = _file_received(self.root, src)
        else:
            got = _file_received(self.root, event.encoded_dataset(include_meta=True))
        with self._lock:
            self._received[got.sop_instance_uid] = got


class OrthancNode:
    """``DEMO_PACS`` as a real Orthanc: what it stores is mirrored into ``root`` for the report.

    Orthanc's change log (``/changes``, one entry per new instance) says what
    arrived; each new instance's file is copied, bit-exact as Orthanc keeps
    it, to ``<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and its arrival
    time is the time the demo first saw it (within one poll of 0.2 s).

    Parameters
    ----------
    orthanc : gateway.apps.viewer.Orthanc
        A started Orthanc.
    root : Path
        Folder for the mirrored instances.
    """

    def __init__(self, orthanc: Orthanc, root: Path) -> None:
        self.orthanc = orthanc
        self.root = root
        self.ae_title = orthanc.ae_title
        self.port: int | None = orthanc.dicom_port
        self._lock = threading.Lock()
        self._received: dict[str, Received] = {}
        self._since = 0
        self._polled = 0.0

    def start(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        self._since = int(self.orthanc.get("/changes?last")["Last"])
        return self.orthanc.dicom_port

    def stop(self) -> None:
        """Nothing of its own to stop: the viewer owns Orthanc."""

    def get(self, sop_instance_uid: str) -> Received | None:
        self._sync()
        with self._lock:
            return self._received.get(sop_instance_uid)

    def count(self) -> int:
        self._sync()
        with self._lock:
            return len(self._received)

    def _sync(self) -> None:
        with self._lock:
            if time.monotonic() - self._polled < 0.2:
                return
            self._polled = time.monotonic()
            while True:
                page = self.orthanc.get(f"/changes?since={self._since}&limit=500")
                for change in page["Changes"]:
                    if change["ChangeType"] == "NewInstance":
                        self._mirror(str(change["ID"]))
                self._since = int(page["Last"])
                if page["Done"]:
                    return

    def _mirror(self, orthanc_id: str) -> None:
        got = _file_received(self.root, self.orthanc.file(orthanc_id))
        self._received[got.sop_instance_uid] = got


#: Either kind of DEMO_PACS.
Pacs = ReceivingNode | OrthancNode
