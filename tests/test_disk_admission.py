"""Disk admission: limits kept while a C-STORE streams in, on a real small filesystem.

The gateway's data dir is a 32 MiB tmpfs mounted for the test (as root, or
with passwordless sudo; the tests fail, not skip, without), so free space is what
statvfs says, exactly as in production: no probe is faked. A ballast file
sets how much is free.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, _config

from gateway._admission import AdmittedStream
from gateway.ingest import RefusalReason, Refused
from gateway.status import StorageStatus
from tests.conftest import GatewayProcess, http_get, mr_series, storescu, wait_for
from tests.test_ingest import _echo_ok, _send_raw

MiB = 1 << 20
WATERMARK = 4 * MiB


# A real small filesystem, not an emulated free-space probe: the test command runs as root
# or with sudo (ops/setup.sh installs with apt-get), and so can mount one.
_PRIVILEGED = [] if os.geteuid() == 0 else ["sudo", "-n"]


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    cmd = [*_PRIVILEGED, "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        pytest.fail(
            f"cannot mount a {size // MiB} MiB tmpfs for the disk-full tests: run the suite as root or with"
            f" passwordless sudo ({r.stderr.decode(errors='replace').strip()})"
        )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "fs"
    _mount_tmpfs(where, 32 * MiB)
    try:
        yield where
    finally:
        subprocess.run([*_PRIVILEGED, "umount", "-l", str(where)], check=False)


def free(path: Path) -> int:
    return shutil.disk_usage(path).free


def set_free(fs: Path, target: int) -> None:
    """Grow or shrink the ballast file so that about ``target`` bytes are free."""
    ballast = fs / "ballast"
    have = ballast.stat().st_size if ballast.exists() else 0
    size = max(0, have + free(fs) - target)
    with open(ballast, "ab") as fh:
        fh.truncate(0)
        fh.write(b"\0" * size)  # tmpfs: written pages count as used
    assert abs(free(fs) - target) < MiB


def big_instance(folder: Path, megabytes: int) -> Path:
    (src,) = mr_series(folder, n=1, seed=90 + megabytes)
    ds = dcmread(src)
    ds.Rows, ds.Columns = 1024, megabytes * 512  # 16-bit: 1 MiB per 512 columns
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype="<u2").tobytes()
    ds.save_as(src, enforce_file_format=True)
    return src


def lowest_free_while(fs: Path, action: Callable[[], int]) -> tuple[int, int]:
    """Run ``action`` while sampling free space every millisecond: (its result, the lowest free space seen)."""
    lowest = [free(fs)]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], free(fs))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = action()
    finally:
        done.set()
        watcher.join()
    return result, lowest[0]


def readyz(gw: GatewayProcess) -> tuple[int, bytes]:
    return http_get(f"http://127.0.0.1:{gw.metrics_port}/readyz")


@pytest.fixture
def gw_on_small_fs(small_fs: Path, make_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    gw = make_gateway(
        start=False,
        gateway={
            "data_dir": str(small_fs / "data"),
            "database_url": f"sqlite:///{small_fs.parent / 'index.sqlite'}",  # the index stays off the small disk
            "min_free_bytes": WATERMARK,
            "max_pdu_bytes": 65536,
        },
    )
    gw.data_dir = small_fs / "data"
    # A partial upload a crashed process left behind: never acknowledged, removed at start.
    (gw.data_dir / "incoming").mkdir(parents=True)
    (gw.data_dir / "incoming" / "tmpstale.dcm").write_bytes(b"\0" * 1000)
    return gw.start()


def test_a_store_larger_than_the_free_space_gets_a700_and_leaves_nothing(
    tmp_path: Path, small_fs: Path, gw_on_small_fs: GatewayProcess
) -> None:
    gw = gw_on_small_fs
    assert list((gw.data_dir / "incoming").iterdir()) == []  # the stale file went at start-up
    big = big_instance(tmp_path / "big", 20)
    assert big.stat().st_size > 20 * MiB
    set_free(small_fs, 8 * MiB)

    status, lowest = lowest_free_while(small_fs, lambda: _send_raw(gw.port, big))
    assert status == StorageStatus.OUT_OF_RESOURCES
    # Writing stopped at the watermark (one PDU of slack), far from a full disk, and the part is gone now.
    assert lowest >= WATERMARK - 128 * 1024, lowest
    assert list((gw.data_dir / "incoming").iterdir()) == []
    assert free(small_fs) > 7 * MiB

    # The association and the listener carry on: the next small store succeeds.
    (small,) = mr_series(tmp_path / "small", n=1, seed=95)
    assert storescu(gw.port, [small]).returncode == 0
    assert _echo_ok(gw)
    m = gw.metrics()
    assert m['aigw_instances_received_total{outcome="refused_space",transport="dimse"}'] == 1
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 1
    assert "refused while streaming, partial file removed" in gw.log()


def test_an_instance_over_max_instance_bytes_is_cut_off_while_it_streams(
    tmp_path: Path, small_fs: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(gateway={"max_instance_bytes": 2 * MiB, "data_dir": str(small_fs / "data")})
    gw.data_dir = small_fs / "data"
    before = free(small_fs)
    big = big_instance(tmp_path, 3)  # over the limit by less than the limit: read on, answered
    status, lowest = lowest_free_while(small_fs, lambda: _send_raw(gw.port, big))
    assert status == StorageStatus.OUT_OF_RESOURCES
    assert before - lowest < 3 * MiB  # never more than the limit (and a page or two) on disk
    assert list((gw.data_dir / "incoming").iterdir()) == []
    m = gw.metrics()
    assert m['aigw_instances_received_total{outcome="refused_size",transport="dimse"}'] == 1


def test_readyz_and_the_gauge_follow_the_watermark_and_stores_are_refused_before_data(
    tmp_path: Path, small_fs: Path, gw_on_small_fs: GatewayProcess
) -> None:
    gw = gw_on_small_fs
    assert readyz(gw)[0] == 200 and gw.metrics()["aigw_refusing_for_space"] == 0
    set_free(small_fs, WATERMARK - MiB)
    code, body = readyz(gw)
    assert code == 503 and b'"free_space_above_watermark": false' in body
    assert gw.metrics()["aigw_refusing_for_space"] == 1
    (src,) = mr_series(tmp_path / "s", n=1, seed=97)
    assert _send_raw(gw.port, src) == StorageStatus.OUT_OF_RESOURCES  # admitted never: no byte written
    assert list((gw.data_dir / "incoming").iterdir()) == []
    set_free(small_fs, 16 * MiB)
    assert readyz(gw)[0] == 200 and gw.metrics()["aigw_refusing_for_space"] == 0
    assert storescu(gw.port, [src]).returncode == 0


def test_an_aborted_store_leaves_no_partial_file(
    tmp_path: Path, small_fs: Path, gw_on_small_fs: GatewayProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydicom.filereader import read_file_meta_info
    from pynetdicom.transport import AssociationSocket

    gw = gw_on_small_fs
    set_free(small_fs, 30 * MiB)
    big = big_instance(tmp_path, 12)
    incoming = gw.data_dir / "incoming"
    # Our client sends slowly (5 ms a PDU), so that the connection drops while the data set streams.
    send = AssociationSocket.send

    def slow_send(self: AssociationSocket, data: bytes) -> None:
        time.sleep(0.005)
        send(self, data)

    monkeypatch.setattr(AssociationSocket, "send", slow_send)
    aborted = threading.Event()
    meta = read_file_meta_info(big)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="AIGW")
    assert assoc.is_established

    def abort_when_streaming() -> None:
        wait_for(lambda: any(p.stat().st_size > MiB for p in incoming.iterdir()), 20, "the upload to start")
        aborted.set()
        # The scanner dies mid-transfer: the connection drops (an A-ABORT would queue behind the data).
        sock = assoc.dul.socket
        assert sock is not None and sock.socket is not None
        sock.socket.shutdown(socket.SHUT_RDWR)

    killer = threading.Thread(target=abort_when_streaming)
    killer.start()
    try:
        assoc.send_c_store(big)
    except (RuntimeError, OSError):
        pass  # the send was cut off by our own abort
    killer.join()
    assert aborted.is_set()
    # Removed at once when the association ends, not by the hourly sweep.
    wait_for(lambda: list(incoming.iterdir()) == [], 5, "the partial file to be removed")
    assert not list((gw.data_dir / "store").rglob("*.dcm"))
    assert _echo_ok(gw)


# ------------------------------------------------------------------ the stream object itself
def test_a_full_disk_mid_write_is_out_of_resources_and_the_part_is_removed(small_fs: Path) -> None:
    stream = AdmittedStream(lambda written, incoming: None, small_fs)  # no watermark: only the disk stops it
    path = Path(stream.name)
    chunk = b"\0" * MiB
    for _ in range(40):
        stream.file.flush()
        assert stream.write(chunk) == len(chunk)  # dropped fragments still count as consumed
    assert stream.refused is not None and stream.refused.reason is RefusalReason.OUT_OF_RESOURCES
    assert not path.exists()
    stream.close()


def test_admission_is_asked_before_the_first_byte_and_each_fragment(tmp_path: Path) -> None:
    asked: list[tuple[int, int]] = []
    limit = Refused(RefusalReason.INSTANCE_TOO_LARGE, "too large")

    def admit(written: int, incoming: int) -> Refused | None:
        asked.append((written, incoming))
        return limit if written + incoming > 250 else None

    stream = AdmittedStream(admit, tmp_path)
    for _ in range(4):
        stream.write(b"x" * 100)
    assert asked == [(0, 0), (0, 100), (100, 100), (200, 100)]  # no question once refused
    assert stream.refused is limit and not os.path.exists(stream.name)
    refused_at_once = AdmittedStream(lambda w, i: limit, tmp_path)
    assert refused_at_once.refused is limit and not os.path.exists(refused_at_once.name)
    refused_at_once.write(b"data")
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_measured_rarely_far_from_the_watermark_and_often_near_it() -> None:
    from gateway.ingest import _FreeSpace

    disk = {"free": 100 * MiB}
    measured: list[int] = []

    def measure() -> int:
        measured.append(disk["free"])
        return disk["free"]

    space = _FreeSpace(measure, watermark=4 * MiB)
    chunk = 16 * 1024
    refused_at = None
    for _ in range(100 * MiB // chunk):
        free = space.free(chunk)
        assert free <= disk["free"], "the estimate never says more than is free"
        if free - chunk < 4 * MiB:
            refused_at = disk["free"]
            break
        disk["free"] -= chunk  # the write
    assert refused_at is not None and 4 * MiB <= refused_at < 4 * MiB + chunk, "writing stopped at the watermark"
    # 6,000 fragments, a few dozen measurements: halving the headroom each time.
    assert 5 <= len(measured) <= 40, len(measured)


def test_a_refused_data_set_that_goes_on_and_on_is_aborted(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(gateway={"max_instance_bytes": 2 * MiB})
    big = big_instance(tmp_path, 10)  # refused at 2 MiB; 2 MiB more are dropped, then the association ends
    t0 = time.monotonic()
    status = _send_raw(gw.port, big)
    assert status == -1, f"answered {status:#06x} after reading 10 MiB"
    assert time.monotonic() - t0 < 30
    m = gw.metrics()
    assert m['aigw_associations_rejected_total{reason="data_set_too_large"}'] == 1
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 0
    wait_for(lambda: list((gw.data_dir / "incoming").iterdir()) == [], 5, "no partial file")
    (small,) = mr_series(tmp_path / "small", n=1, seed=96)
    assert storescu(gw.port, [small]).returncode == 0
