"""Completion and job semantics through the running service: hints, late
instances, forced completion, retries, permanent failures, unrouted series."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.index import JobRow
from gateway.storage import DataDir
from tests.conftest import GatewayProcess, Orthanc, http_get, mr_series, storescu, wait_for

pytestmark = pytest.mark.peers


def jobs(gw: GatewayProcess) -> list[JobRow]:
    idx = gw.index()
    try:
        return list(reversed(idx.list_jobs()))
    finally:
        idx.close()


def outbox_files(gw: GatewayProcess) -> list[Path]:
    return sorted((gw.data_dir / "outbox").rglob("*.dcm"))


def test_association_release_completes_series_early(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = make_gateway(series_timeout=60, release_quiet=0.5)
    t0 = time.time()
    assert storescu(gw.port, mr_series(tmp_path / "s", n=3)).returncode == 0
    wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 20, "the job to finish")
    assert time.time() - t0 < 20  # far below the 60 s quiet period
    assert gw.metrics()['aigw_series_completed_total{cause="release"}'] == 1
    assert len(outbox_files(gw)) == 3  # no destination configured: results in the outbox


def test_images_in_acquisition_hint(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    gw = make_gateway(series_timeout=60, release_quiet=None)
    files = mr_series(tmp_path / "s", n=3, seed=3)
    for f in files:
        ds = dcmread(f)
        ds.ImagesInAcquisition = 3
        ds.save_as(f)
    # One association per instance, as some scanners do: only the hint can end the wait.
    for f in files:
        assert storescu(gw.port, [f]).returncode == 0
    wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 20, "hinted completion")
    assert gw.metrics()['aigw_series_completed_total{cause="hint"}'] == 1


def test_late_instance_reprocesses_as_new_version(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    gw = make_gateway()
    files = mr_series(tmp_path / "s", n=3, seed=5)
    assert storescu(gw.port, files[:2]).returncode == 0
    wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 20, "first version")
    assert storescu(gw.port, files[2:]).returncode == 0
    done = wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"][1:], 20, "second version")
    assert [j.series_version for j in jobs(gw)] == [1, 2] and done[0].outputs == 3
    v1, v2 = ({p.name for p in (gw.data_dir / "outbox" / f"{j.id:08d}").iterdir()} for j in jobs(gw))
    assert not v1 & v2  # a new version has new UIDs, never overwriting the old result


def test_late_instance_ignored_by_policy(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    gw = make_gateway(extra_toml="")
    gw.stop()
    text = gw.config.read_text().replace("[completion]\n", '[completion]\nlate_instances = "ignore"\n')
    gw.config.write_text(text)
    gw.start()
    files = mr_series(tmp_path / "s", n=2, seed=6)
    assert storescu(gw.port, files[:1]).returncode == 0
    wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 20, "first version")
    assert storescu(gw.port, files[1:]).returncode == 0
    time.sleep(3)
    assert len(jobs(gw)) == 1


def test_force_complete_and_retry_after_transient_failures(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = make_gateway(series_timeout=600, release_quiet=None, extra_toml="[pipelines.test-invert]\nfail_times = 2\n")
    files = mr_series(tmp_path / "s", n=2, seed=8)
    assert storescu(gw.port, files).returncode == 0
    time.sleep(1)
    assert jobs(gw) == []
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    r = gw.cli("series", "complete", uid)
    assert r.returncode == 0, r.stderr
    job = wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 30, "success after retries")[0]
    assert job.attempts == 3, jobs(gw)
    assert len(jobs(gw)) == 1, jobs(gw)
    m = gw.metrics()
    assert m['aigw_jobs_total{outcome="retried",pipeline="test-invert"}'] == 2
    assert m['aigw_series_completed_total{cause="forced"}'] == 1


def test_input_error_fails_once_and_manual_retry(make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    gw = make_gateway()
    assert storescu(gw.port, mr_series(tmp_path / "s", n=1, description="REJECT me", seed=9)).returncode == 0
    job = wait_for(lambda: [j for j in jobs(gw) if j.state == "failed"], 20, "permanent failure")[0]
    assert job.attempts == 1 and "input rejected" in job.error
    out = gw.cli("jobs", "list")
    assert "failed" in out.stdout and "input rejected" in out.stdout
    assert gw.cli("jobs", "retry", str(job.id)).returncode == 0
    wait_for(
        lambda: (
            jobs(gw)[0].attempts == 1 and jobs(gw)[0].state == "failed" and jobs(gw)[0].finished_at > job.finished_at
        ),
        20,
        "the retried job to fail again",
    )
    assert gw.cli("jobs", "retry", "999").returncode == 1


def test_unrouted_series_counted_and_forwarded(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, orthanc: Orthanc
) -> None:
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], start=False)
    gw.config.write_text(gw.config.read_text().replace("[completion]\n", '[completion]\nunrouted = "forward"\n'))
    gw.start()
    from pydicom.data import get_testdata_file

    ct_file = get_testdata_file("CT_small.dcm")  # the test pipeline only takes MR
    assert isinstance(ct_file, str), "pydicom's test file CT_small.dcm is missing"
    ct = Path(ct_file)
    assert storescu(gw.port, [ct], extra=["-xe"]).returncode == 0
    wait_for(lambda: orthanc.instance_uids(), 30, "the original forwarded to PACS")
    assert gw.metrics()["aigw_series_unrouted_total"] == 1
    assert jobs(gw) == []


def test_an_outbox_folder_appears_whole_and_a_retry_replaces_it(tmp_path: Path) -> None:
    # Scripts and people pick results up from the outbox as soon as a job's
    # folder shows: it must never be there with only some of the files.
    data = DataDir(tmp_path / "data")
    final = data.outbox_dir(7)
    staged = data.outbox_staging(7)
    (staged / "a.dcm").write_bytes(b"first attempt")
    assert not final.exists() and not list((data.root / "outbox").rglob("*.dcm"))
    data.publish_outbox(staged, final)
    assert [p.name for p in final.iterdir()] == ["a.dcm"] and not staged.exists()
    # The job ran again after a crash between the rename and the index update.
    staged = data.outbox_staging(7)
    (staged / "b.dcm").write_bytes(b"second attempt")
    data.publish_outbox(staged, final)
    assert [p.name for p in final.iterdir()] == ["b.dcm"]


def test_a_job_that_kills_its_process_fails_for_good_after_max_starts(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = make_gateway(series_timeout=1, release_quiet=0.2, jobs={"max_starts": 2})
    assert storescu(gw.port, mr_series(tmp_path / "c", n=2, description="CRASH", seed=91)).returncode == 0

    # What systemd's Restart=always or Docker's restart policy does.
    restarts = 0
    end = time.time() + 90
    while not [j for j in jobs(gw) if j.state == "failed"]:
        assert time.time() < end, f"no end to the crash loop after {restarts} restarts"
        if gw.proc is not None and gw.proc.poll() is None:
            time.sleep(0.2)
            continue
        restarts += 1
        try:
            gw.start()
        except AssertionError:
            pass  # it died again before it was ready
    # Started at the first start and after the first restart; the second restart fails it.
    (job,) = jobs(gw)
    assert restarts == 2 and job.attempts == 2, (restarts, job)
    assert job.error is not None and "max_starts" in job.error
    assert "failed for good: started 2 times and its process died" in gw.log()
    assert gw.metrics()['aigw_jobs_total{outcome="failed",pipeline="test-invert"}'] == 1
    # The service stays up and runs the next series.
    assert storescu(gw.port, mr_series(tmp_path / "ok", n=2, seed=92)).returncode == 0
    wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 30, "the next series' job")
    assert gw.proc is not None and gw.proc.poll() is None


def test_interrupted_jobs_restart_at_once_twice_then_back_off_then_fail(tmp_path: Path) -> None:
    from gateway.config import Config
    from gateway.index import Index, InstanceRecord
    from gateway.jobs import take_back_interrupted
    from gateway.metrics import Metrics

    idx = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    config = Config.model_validate({"jobs": {"max_starts": 4, "backoff_seconds": 10, "backoff_max_seconds": 600}})
    metrics = Metrics()
    try:
        rec = InstanceRecord(
            "1.2.3.1", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
            tmp_path / "x", 1, "0" * 64, "S", "MR", {"Modality": "MR"},
        )  # fmt: skip
        idx.record_instance(rec, now=time.time(), quiet_seconds=0, reprocess_late=True)
        (job_id,) = idx.mark_routed("1.2.3", 1, [("r", "test-invert")], now=time.time(), completed_by="timer") or []
        waits = []
        for _ in range(3):  # started, and its process dies, three times
            job = idx.claim_job("host:1", now=time.time() + 10_000, lease_seconds=60, job_id=job_id)
            assert job is not None
            t0 = time.time()
            assert take_back_interrupted(idx, config, metrics, expired_only=False) == 1
            waits.append(next(j for j in idx.list_jobs() if j.id == job_id).next_attempt_at - t0)
        assert waits[0] < 1 and waits[1] < 1, "a kill -9 or a restart costs no delay"
        assert 8 <= waits[2] <= 12  # then backoff_seconds, +-20 % jitter
        job = idx.claim_job("host:1", now=time.time() + 10_000, lease_seconds=60, job_id=job_id)
        assert job is not None and job.attempts == 4
        assert take_back_interrupted(idx, config, metrics, expired_only=False) == 0
        (row,) = idx.list_jobs()
        assert row.state == "failed" and row.error is not None and "max_starts = 4" in row.error
        failed = metrics.registry.get_sample_value("aigw_jobs_total", {"pipeline": "test-invert", "outcome": "failed"})
        assert failed == 1
    finally:
        idx.close()


def test_a_hung_job_is_abandoned_and_the_next_one_runs(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    from tests.plugins.invert.pipeline import HANG_SECONDS

    gw = make_gateway(series_timeout=1, release_quiet=0.2, jobs={"timeout_seconds": 2, "workers": 1})
    t0 = time.time()
    assert storescu(gw.port, mr_series(tmp_path / "h", n=2, description="HANG", seed=93)).returncode == 0
    (hung,) = wait_for(lambda: [j for j in jobs(gw) if j.state == "failed"], 15, "the hung job to be abandoned")
    assert hung.error is not None and "timeout_seconds = 2" in hung.error
    # Its thread sleeps on: with workers = 1 the spare thread is used up, and /healthz asks for a restart.
    code, body = http_get(f"http://127.0.0.1:{gw.metrics_port}/healthz")
    assert code == 503 and b"stuck" in body
    assert gw.metrics()["aigw_jobs_abandoned"] == 1
    # Its slot went to the next job, which runs while the hung one still sleeps.
    assert storescu(gw.port, mr_series(tmp_path / "ok", n=2, seed=94)).returncode == 0
    wait_for(lambda: [j for j in jobs(gw) if j.state == "sent"], 15, "the next series' job")
    assert time.time() - t0 < HANG_SECONDS, "the next job waited for the hung one"
    # The hung run ends after all: nothing of it is recorded, and the service is alive again.
    wait_for(lambda: "abandoned run ended after all" in gw.log(), 20, "the hung run to end")
    assert http_get(f"http://127.0.0.1:{gw.metrics_port}/healthz")[0] == 200
    assert [j.state for j in jobs(gw)] == ["failed", "sent"]
    assert "its outputs are dropped" in gw.log()
    assert not (gw.data_dir / "outbox" / f"{hung.id:08d}").exists()
