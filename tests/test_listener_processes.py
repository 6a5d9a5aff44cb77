"""Several listener processes on one port (``[gateway] listener_processes``): ingest on every core.

Real peers: DCMTK ``storescu`` from several processes at once, the gateway as
a subprocess, kill -9 of a listener process and of the gateway itself.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from pydicom import dcmread

from gateway.index import conflicts_t
from tests.conftest import GatewayProcess, mr_series, storescu, wait_for

MakeGateway = Callable[..., GatewayProcess]


def _children(pid: int) -> list[int]:
    """The listener processes of gateway ``pid`` (its multiprocessing resource tracker is not one)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    listeners = []
    for kid in kids:
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            listeners.append(kid)
    return listeners


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stored_exactly(gw: GatewayProcess, files: list[Path]) -> None:
    """Every file is in the index and stored byte for byte as sent (the data set after the meta group)."""
    index = gw.index()
    try:
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            row = index.find_instance(str(ds.SOPInstanceUID))
            assert row is not None, f"{f.name} acknowledged but not in the index"
            sent, stored = dcmread(f), dcmread(row.path)
            assert stored.PixelData == sent.PixelData and stored.SOPInstanceUID == sent.SOPInstanceUID
    finally:
        index.close()


def _send_all(port: int, groups: list[list[Path]]) -> list[int]:
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
        return [r.returncode for r in pool.map(lambda g: storescu(port, g), groups)]


def test_four_senders_into_two_listener_processes_are_stored_bit_exact(
    tmp_path: Path, make_gateway: MakeGateway
) -> None:
    gw = make_gateway(gateway={"listener_processes": 2})
    assert gw.proc is not None
    (child,) = _children(gw.proc.pid)
    busy_before = _cpu(child)
    groups = [mr_series(tmp_path / f"s{i}", n=6, seed=300 + i) for i in range(8)]
    assert _send_all(gw.port, groups) == [0] * 8
    files = [f for g in groups for f in g]
    _stored_exactly(gw, files)
    # Both processes received: the kernel spread eight associations over the two sockets.
    assert _cpu(child) - busy_before > 0.05, "the listener process did no work"
    # One /metrics for all of them: the gateway adds its listener processes' counts to its own.
    stored = gw.metrics()['aigw_instances_received_total{outcome="stored",transport="dimse"}']
    assert stored == len(files)


def test_a_killed_listener_process_loses_nothing_acknowledged_and_comes_back(
    tmp_path: Path, make_gateway: MakeGateway
) -> None:
    gw = make_gateway(gateway={"listener_processes": 2})
    assert gw.proc is not None
    (child,) = _children(gw.proc.pid)
    groups = [mr_series(tmp_path / f"s{i}", n=8, seed=320 + i) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(storescu, gw.port, g) for g in groups]
        time.sleep(0.3)
        os.kill(child, signal.SIGKILL)  # mid-ingest
        codes = [f.result().returncode for f in futures]
    ok = [g for g, code in zip(groups, codes) if code == 0]
    assert ok, "every sender failed: the gateway's own listener should have carried on"
    _stored_exactly(gw, [f for g in ok for f in g])
    # The gateway starts it again, and every group sent again is stored in full.
    pid = gw.proc.pid
    wait_for(lambda: len(_children(pid)) == 1 and _children(pid) != [child], 30, "a new listener")
    assert "listener process 1 (pid" in gw.log() and "starting it again" in gw.log()
    retry = [g for g, code in zip(groups, codes) if code != 0]
    assert _send_all(gw.port, retry or groups[:1]) == [0] * len(retry or groups[:1])
    _stored_exactly(gw, [f for g in groups for f in g])


def test_listener_processes_end_with_the_gateway_and_a_restart_brings_them_back(
    tmp_path: Path, make_gateway: MakeGateway
) -> None:
    gw = make_gateway(gateway={"listener_processes": 3})
    assert gw.proc is not None
    children = _children(gw.proc.pid)
    assert len(children) == 2
    gw.kill9()
    wait_for(lambda: not any(Path(f"/proc/{c}").exists() for c in children), 10, "the listener processes to end")
    gw.start()
    assert gw.proc is not None
    assert len(_children(gw.proc.pid)) == 2
    files = mr_series(tmp_path / "s", n=3, seed=340)
    assert storescu(gw.port, files).returncode == 0
    _stored_exactly(gw, files)


def test_one_uid_from_eight_senders_in_two_processes_is_stored_once_and_never_overwritten(
    tmp_path: Path, make_gateway: MakeGateway
) -> None:
    """Duplicates and conflicts across processes: the per-UID lock spans the listener processes."""
    gw = make_gateway(gateway={"listener_processes": 2})
    first = mr_series(tmp_path / "a", n=4, seed=360)
    other = mr_series(tmp_path / "b", n=4, seed=360)  # the same UIDs ...
    for f in other:  # ... with other pixels: a conflict
        ds = dcmread(f)
        ds.PixelData = bytes(255 - b for b in ds.PixelData)
        ds.save_as(f, enforce_file_format=True)
    assert _send_all(gw.port, [first, other] * 4) == [0] * 8
    index = gw.index()
    try:
        with index._ro() as conn:
            conflicts = conn.execute(sa.select(conflicts_t.c.sop_instance_uid)).scalars().all()
        for a, b in zip(first, other):
            uid = str(dcmread(a, stop_before_pixels=True).SOPInstanceUID)
            row = index.find_instance(uid)
            assert row is not None
            stored = Path(row.path).read_bytes()
            assert hashlib.sha256(stored).hexdigest() == row.sha256, "the stored file is not the one indexed"
            assert dcmread(row.path).PixelData in (dcmread(a).PixelData, dcmread(b).PixelData)
            assert conflicts.count(uid) == 4, "each copy of the other version is kept aside once"
    finally:
        index.close()
