"""A minimal pynetdicom Storage SCP: the floor under any pynetdicom-based receiver.

It is set up like the gateway's listener (every storage SOP class with every
transfer syntax, the same maximum PDU, data sets streamed to a temporary file
with ``STORE_RECV_CHUNKED_DATASET``), but its C-STORE handler only renames
the temporary file into ``OUT_DIR`` and answers success: no parsing, no
hashing, no fsync, no index. That is about what ``storescp`` does, so the
difference between this and storescp is pynetdicom's own cost, and the
difference between this and ``aigw`` is the gateway's.

Usage: ``python _null_scp.py PORT AE_TITLE OUT_DIR``
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]  # made at import

#: The gateway's default ``gateway.max_pdu_bytes``.
MAX_PDU = 262_144


def main() -> int:
    port, ae_title, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    incoming = out.parent / (out.name + ".incoming")
    out.mkdir(parents=True, exist_ok=True)
    incoming.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(incoming)  # same filesystem: the rename is cheap
    counter = itertools.count()

    def on_store(event: Any) -> int:
        os.replace(event.dataset_path, out / f"{next(counter):08d}.dcm")
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = MAX_PDU
    ae.maximum_associations = 32
    for uid in _STORAGE_CLASSES.values():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # block=False returns the server
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
