"""Several listener processes on one port (``[gateway] listener_processes``): ingest on every core.

Real peers: DCMTK ``storescu`` from several processes at once, the gateway as
a subprocess, kill -9 of a listener process and of the gateway itself.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

from gateway.index import conflicts_t
from gateway.slots import Caps, SlotTable
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


# ------------------------------------------------- caps across the processes
def test_caps_hold_for_all_rows_of_the_table_together(tmp_path: Path) -> None:
    table = SlotTable(Caps(max_connections=4, max_per_address=2, max_associations=3), 3, tmp_path / "slots.lock")
    a, b, c = table.row(0), table.row(1), table.row(2)
    assert a.open("10.0.0.1") is None and b.open("10.0.0.1") is None
    assert c.open("10.0.0.1") == "max_connections_per_address"  # two already, in other processes
    assert c.open("10.0.0.2") is None and c.open("10.0.0.3") is None
    assert a.open("10.0.0.4") == "max_connections"  # four in all
    assert table.totals() == (4, 0)
    assert a.associate() and b.associate() and c.associate()
    assert not c.associate()  # max_associations in all
    b.dissociate()
    b.close("10.0.0.1")
    assert a.open("10.0.0.1") is None and a.associate()  # the slots b gave back
    assert a.held() == (2, 2)
    table.clear(2)  # process 2 died: what it held is free
    assert table.totals() == (2, 2)
    assert b.open("10.0.0.5") is None and b.open("10.0.0.5") is None and b.open("10.0.0.5") is not None


def _take(table: SlotTable, number: int, address: str, done: "multiprocessing.synchronize.Event") -> None:
    slots = table.row(number)
    assert slots.open(address) is None and slots.associate()
    done.set()


def test_the_table_is_shared_with_a_spawned_process(tmp_path: Path) -> None:
    """Listener processes are started with ``spawn``: the table they get is the parent's memory."""
    table = SlotTable(Caps(max_connections=2, max_per_address=1, max_associations=1), 2, tmp_path / "slots.lock")
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    proc = ctx.Process(target=_take, args=(table, 1, "10.0.0.1", done))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and done.is_set()
    mine = table.row(0)
    assert table.totals() == (1, 1)
    assert mine.open("10.0.0.1") == "max_connections_per_address"
    assert mine.open("10.0.0.2") is None and not mine.associate()


def _associate(port: int, source: str) -> Association:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="AIGW", bind_address=(source, 0))


def test_caps_hold_for_all_listener_processes_together_and_a_dead_ones_slots_come_back(
    make_gateway: MakeGateway,
) -> None:
    """However the kernel spreads connections over four processes, the caps are the site's, not a share."""
    gw = make_gateway(gateway={"listener_processes": 4, "max_associations": 4, "max_connections_per_address": 3})
    assert gw.proc is not None
    pid = gw.proc.pid
    children = _children(pid)
    assert len(children) == 3

    def fill() -> list[Association]:
        held = [_associate(gw.port, "127.0.0.1") for _ in range(3)]
        assert all(a.is_established for a in held), "refused under max_connections_per_address"
        over = _associate(gw.port, "127.0.0.1")
        assert over.is_rejected, "a fourth association from one address was accepted"
        held.append(_associate(gw.port, "127.0.0.2"))
        assert held[-1].is_established, "refused under max_associations"
        over = _associate(gw.port, "127.0.0.3")
        assert over.is_rejected, "a fifth association was accepted"
        return held

    held = fill()
    metrics = gw.metrics()
    assert metrics['aigw_associations_rejected_total{reason="address_connection_limit"}'] == 1
    assert metrics['aigw_associations_rejected_total{reason="local_limit_exceeded"}'] == 1
    # kill -9 of every listener process: what they held is given back when they are started again.
    for child in children:
        os.kill(child, signal.SIGKILL)
    wait_for(lambda: len(set(_children(pid)) - set(children)) == 3, 60, "three new listener processes")
    for assoc in held:
        if assoc.is_established:
            assoc.release()

    def refill() -> bool:
        held = [_associate(gw.port, "127.0.0.1") for _ in range(3)] + [_associate(gw.port, "127.0.0.2")]
        ok = all(a.is_established for a in held)
        for a in held:
            if a.is_established:
                a.release()
        return ok

    wait_for(refill, 20, "every slot free again", interval=0.5)
