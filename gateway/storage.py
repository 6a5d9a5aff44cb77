"""The data directory: durable, bit-exact files.

Layout under ``data_dir``::

    incoming/                         C-STORE payloads while they arrive
    store/<study>/<series>/<sop>.dcm  instances exactly as received
    conflicts/<sop>.<hash>.dcm        a different payload under a known UID
    jobs/<job id>/                    pipeline work folders and results
    outbox/<job id>/                  results when no destination is configured

Every path segment below ``store`` is a UID checked by
:func:`gateway.uids.checked_uid`; no other DICOM value is used in a path.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gateway.uids import checked_uid

__all__ = ["DataDir", "fsync_dir", "install_file", "sha256_file", "write_durably"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or new entry in it survives power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def install_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and atomically move it to ``final``.

    Order matters: data fsync, then rename, then directory fsync, so after a
    crash ``final`` either does not exist or holds the complete file.
    """
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Temporary file on another filesystem: copy next to the target first.
        side = final.with_name(final.name + ".part")
        shutil.copyfile(tmp, side)
        with open(side, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(side, final)
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)


@contextmanager
def write_durably(final: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``final``; on clean exit install it durably."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    fh = open(tmp, "wb")
    try:
        yield fh
        fh.close()
        install_file(tmp, final)
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise


class DataDir:
    """Paths and space accounting of the gateway's data directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        for sub in ("incoming", "store", "conflicts", "jobs", "outbox"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.root
            / "store"
            / checked_uid(study_uid, "StudyInstanceUID")
            / checked_uid(series_uid, "SeriesInstanceUID")
            / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        )

    def conflict_path(self, sop_uid: str, digest: str) -> Path:
        return self.root / "conflicts" / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.{digest[:16]}.dcm"

    def job_dir(self, job_id: int) -> Path:
        path = self.root / "jobs" / f"{int(job_id):08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def outbox_dir(self, job_id: int) -> Path:
        return self.root / "outbox" / f"{int(job_id):08d}"

    def outbox_staging(self, job_id: int) -> Path:
        """A new empty folder, beside the job's work, where one run writes its results first.

        One per run: a run that lost its lease may still be writing while the
        run that replaced it starts (a crashed run's folder stays in the job's
        work folder, which is not the outbox).
        """
        path = self.job_dir(job_id) / f"outbox.partial.{uuid.uuid4().hex}"
        path.mkdir()  # not mkdtemp: its mode 0700 would go with the folder into the outbox
        return path

    def publish_outbox(self, staged: Path, final: Path) -> None:
        """Move a job's complete, durable results into the outbox in one rename."""
        if final.exists():
            # The same job ran again (a retry after a crash between the rename and
            # the index update): its new results replace the old ones whole.
            shutil.rmtree(final)
        os.rename(staged, final)
        fsync_dir(final.parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def is_writable(self) -> bool:
        probe = self.root / f".probe.{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def clean_incoming(self, older_than: float | None = None) -> int:
        """Remove partial uploads that were never acknowledged.

        At start every file goes (the previous process crashed or stopped);
        while running, only files untouched for ``older_than`` seconds, which
        an aborted association left behind (a live upload is written to
        continuously, so its mtime stays fresh).
        """
        import time

        n = 0
        limit = time.time() - older_than if older_than is not None else None
        for p in self.incoming.iterdir():
            try:
                if limit is not None and p.stat().st_mtime > limit:
                    continue
                p.unlink()
                n += 1
            except OSError:
                pass
        return n
