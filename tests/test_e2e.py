"""End to end through real peers: storescu (scanner) -> gateway -> Orthanc (PACS).

Covers the result path, crashes (kill -9 mid-series and mid-job) with
exactly-once delivery, PACS down then up, and permanent rejection into the
dead-letter list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.index import JobRow, SendRow
from tests.conftest import GatewayProcess, Orthanc, http_get, mr_series, storescu, wait_for

pytestmark = pytest.mark.peers


def _jobs(gw: GatewayProcess) -> list[JobRow]:
    idx = gw.index()
    try:
        return idx.list_jobs()
    finally:
        idx.close()


def test_series_goes_through_pipeline_to_orthanc(
    tmp_path: Path, orthanc: Orthanc, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"])
    files = mr_series(tmp_path / "in", n=4)
    r = storescu(gw.port, files)
    assert r.returncode == 0, r.stderr
    uids = wait_for(lambda: len(orthanc.instance_uids()) == 4 and orthanc.instance_uids(), 60, "results in Orthanc")
    assert all(u.startswith("2.25.") for u in uids)
    jobs = wait_for(lambda: [j for j in _jobs(gw) if j.state == "sent"], 20, "job state sent")
    assert len(jobs) == 1 and jobs[0].outputs == 4
    code, body = http_get(f"http://127.0.0.1:{gw.metrics_port}/readyz")
    checks = {"database": True, "data_dir_writable": True, "listener": True, "free_space_above_watermark": True}
    assert code == 200 and json.loads(body)["checks"] == checks
    assert http_get(f"http://127.0.0.1:{gw.metrics_port}/healthz")[0] == 200
    m = gw.metrics()
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 4
    assert m['aigw_jobs_total{outcome="succeeded",pipeline="test-invert"}'] == 1
    assert m['aigw_send_attempts_total{destination="orthanc",outcome="sent"}'] == 4
    # The derived series is marked derived and references nothing identifying in logs.
    tags = orthanc.get(f"/instances/{orthanc.get('/instances')[0]}/simplified-tags")
    assert tags["ImageType"].startswith("DERIVED")
    log = gw.log()
    for src in files:
        from pydicom import dcmread

        ds = dcmread(src, stop_before_pixels=True)
        assert str(ds.PatientName) not in log and str(ds.PatientID) not in log


def test_kill9_mid_job_then_restart_delivers_exactly_once(
    tmp_path: Path, orthanc: Orthanc, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(
        extra_toml="[pipelines.test-invert]\nsleep_seconds = 4\n",
        destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
    )
    files = mr_series(tmp_path / "in", n=3, seed=7)
    assert storescu(gw.port, files).returncode == 0
    wait_for(lambda: any(j.state == "running" for j in _jobs(gw)), 30, "the job to start")
    gw.kill9()
    assert orthanc.instance_uids() == []
    gw.start()
    wait_for(lambda: len(orthanc.instance_uids()) >= 3, 60, "results after restart")
    time.sleep(1.5)  # anything duplicated would show up now
    uids = orthanc.instance_uids()
    assert len(uids) == 3 and len(set(uids)) == 3
    jobs = _jobs(gw)
    assert len(jobs) == 1 and jobs[0].attempts == 2


def test_kill9_mid_series_resumes_completion(
    tmp_path: Path, orthanc: Orthanc, make_gateway: Callable[..., GatewayProcess]
) -> None:
    # A quiet period long enough to span the restart: the timer lives in the
    # index, so it resumes rather than completing half a series.
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], series_timeout=12, release_quiet=10)
    files = mr_series(tmp_path / "in", n=4, seed=9)
    assert storescu(gw.port, files[:2]).returncode == 0
    gw.kill9()  # acknowledged instances must survive
    gw.start()
    assert storescu(gw.port, files[2:]).returncode == 0
    wait_for(lambda: len(orthanc.instance_uids()) >= 4, 60, "results for the whole series")
    time.sleep(1.5)
    uids = orthanc.instance_uids()
    assert len(uids) == 4 and len(set(uids)) == 4


def test_pacs_down_then_up(tmp_path: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # configured, not started: connection refused
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{pacs.dicom_port}"])
    files = mr_series(tmp_path / "in", n=2, seed=11)
    assert storescu(gw.port, files).returncode == 0
    wait_for(
        lambda: gw.metrics().get('aigw_send_attempts_total{destination="orthanc",outcome="retry"}', 0) >= 2,
        60,
        "send retries while PACS is down",
    )
    pacs.start()
    try:
        wait_for(lambda: len(pacs.instance_uids()) == 2, 60, "results after PACS came back")
        out = gw.cli("deadletter", "list")
        assert "dead-letter list is empty" in out.stdout
    finally:
        pacs.stop()


def test_permanent_rejection_goes_to_deadletter_and_can_be_retried(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    # A destination configured with the wrong AE title: Orthanc checks the
    # called AE and rejects the association permanently (PS3.8 9.3.4).
    strict = Orthanc(tmp_path / "strict", check_called_aet=True).start()
    try:
        gw = make_gateway(destinations=[f"WRONGAE@127.0.0.1:{strict.dicom_port}"])
        files = mr_series(tmp_path / "in", n=2, seed=13)
        assert storescu(gw.port, files).returncode == 0
        wait_for(lambda: [s.state for s in _sends(gw)] == ["dead", "dead"], 60, "two dead-letter entries")
        sends = _sends(gw)
        # The rejection ends each send at once. An attempt before it that failed
        # transiently (a loaded machine) is allowed; one after it is the bug.
        history = [line for line in gw.log().splitlines() if "gateway.scu: send" in line]
        for s in sends:
            mine = [line for line in history if f"send {s.id} to wrongae" in line]
            assert "rejected" in (s.error or "") and "gave up" not in (s.error or ""), mine
            assert mine and "dead-letter" in mine[-1] and not any("rejected" in line for line in mine[:-1]), mine
            assert s.attempts == len(mine), mine
        out = gw.cli("deadletter", "list")
        assert out.returncode == 0 and "wrongae" in out.stdout, out.stdout + out.stderr
        assert gw.metrics()["aigw_deadletter_size"] == 2
        r = gw.cli("deadletter", "retry", "--all")
        assert r.returncode == 0 and "2 send(s) queued again" in r.stdout
        wait_for(lambda: all(s.attempts == 1 and s.state == "dead" for s in _sends(gw)), 60, "retried sends")
    finally:
        strict.stop()


def test_aborting_destination_is_retried_then_dead_lettered(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    # Orthanc that refuses C-STORE from unknown modalities aborts the
    # association: transient for us, retried, then dead-lettered (no endless loop).
    strict = Orthanc(tmp_path / "strict", always_allow_store=False).start()
    try:
        gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{strict.dicom_port}"], extra_toml="")
        files = mr_series(tmp_path / "in", n=1, seed=17)
        assert storescu(gw.port, files).returncode == 0
        wait_for(lambda: [s.state for s in _sends(gw)] == ["dead"], 90, "the send to give up")
        (send,) = _sends(gw)
        assert send.attempts == 10
        assert strict.instance_uids() == []
    finally:
        strict.stop()


def _sends(gw: GatewayProcess) -> list[SendRow]:
    """Every send in the gateway's index: forwarded originals (job 0) and each job's results."""
    idx = gw.index()
    try:
        return [s for job_id in [0, *(j.id for j in idx.list_jobs(limit=1000))] for s in idx.sends_for_job(job_id)]
    finally:
        idx.close()
