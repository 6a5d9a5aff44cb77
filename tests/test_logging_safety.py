"""Logs a peer cannot forge lines in, without source UIDs, and warnings about what the configuration leaves open."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from gateway import _logging
from gateway.config import Config, MetricsSettings
from gateway.service import _warn_exposure, exposure_warnings
from tests.conftest import REPO, GatewayProcess, mr_series, storescu, wait_for

FORGED = "2026-01-01 00:00:00 INFO forged"
#: A SOP Instance UID that would, written raw, start a forged line and repaint the terminal.
EVIL_UID = f"1.2.3\n{FORGED}\x1b[2J"
#: A calling AE title (16 bytes at most, PS3.8 9.3.2) with a line break inside.
EVIL_AE = b"X\n2026 INFO fake"


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("pynetdicom.utils", logging.WARNING, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_formatters_escape_every_control_character(fmt: str) -> None:
    formatter = _logging._JsonFormatter() if fmt == "json" else _logging._SafeTextFormatter("%(asctime)s %(message)s")
    try:
        raise ValueError(f"bad UID {EVIL_UID}")
    except ValueError as e:
        exc = e
    out = formatter.format(_record("value %r then %s \r\t\x85\u2028\x7f", "x", EVIL_UID, exc=exc))
    for line in out.splitlines():
        assert not line.startswith(FORGED), out
        assert "\x1b" not in line and "\r" not in line and "\x85" not in line and "\u2028" not in line
    if fmt == "json":
        (line,) = out.splitlines()  # one record, one line
        record = json.loads(line)
        assert record["msg"].endswith(f"1.2.3\\n{FORGED}\\x1b[2J \\r\\t\\x85\\u2028\\x7f")
        assert "\n" + FORGED not in record["exc"] and f"\\n{FORGED}" in record["exc"]
    else:
        first, *traceback = out.splitlines()
        assert first.endswith(f"1.2.3\\n{FORGED}\\x1b[2J \\r\\t\\x85\\u2028\\x7f")
        assert traceback and all(line.startswith("    ") for line in traceback)  # under the record, never a record
        assert f"\\n{FORGED}" in traceback[-1]


def _associate_rq(calling: bytes, called: bytes = b"AIGW") -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) for Verification, built by hand so the AE title can be anything."""

    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(payload)) + payload

    context = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + context + pc + user
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_peer_cannot_forge_log_lines(tmp_path: Path, make_gateway: Callable[..., GatewayProcess], fmt: str) -> None:
    gw = make_gateway(f'[logging]\nformat = "{fmt}"\n', gateway={"allow_ae": ["SCANNER"]})
    # 1. A calling AE title with a line break, in a raw A-ASSOCIATE-RQ.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(_associate_rq(EVIL_AE))
        s.recv(1024)  # A-ASSOCIATE-RJ or A-ABORT: either way it was read and judged
    # 2. A C-STORE whose SOP Instance UID (command and data set) carries a forged line and an ANSI escape.
    ds = dcmread(mr_series(tmp_path / "s", n=1)[0])
    ds.SOPInstanceUID = EVIL_UID
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="AIGW")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210
    gw.stop()  # everything written
    log = gw.log()
    # Both values reached the log (so this test can fail), escaped.
    assert "X\\n2026 INFO fake" in log.replace("\\\\", "\\")
    assert f"1.2.3\\n{FORGED}" in log.replace("\\\\", "\\")
    lines = log.splitlines()
    for line in lines:
        assert not line.startswith((FORGED, "2026 INFO fake")), line
        assert "\x1b" not in line, line
    if fmt == "json":
        for line in lines:
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(record), line
    # A gateway on loopback is not open to the network: no warning.
    assert "open to the network" not in log


def test_a_job_logs_no_source_uid(tmp_path: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway()
    files = mr_series(tmp_path / "s", n=3)
    assert storescu(gw.port, files).returncode == 0
    wait_for(lambda: gw.metrics().get('aigw_jobs_total{outcome="succeeded",pipeline="test-invert"}') == 1, 60, "job")
    gw.stop()
    log = gw.log()
    assert "job" in log
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert uid not in log, f"source UID {uid} in the gateway log"


_IVIM_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gateway import _logging

    _logging.configure("INFO", "text", sys.argv[2])
    from pipelines.ivim.lab.synthetic import make_dwi_study
    from pipelines.ivim.pipeline import IvimPipeline
    from tests.test_ivim_pipeline import as_series, context

    study = make_dwi_study(Path(sys.argv[1]), seed=3, size=16, slices=1)
    out = IvimPipeline().run(as_series(study.paths), context())
    assert out, "no output"
    """
)


@pytest.mark.parametrize("third_party_level", ["WARNING", "INFO"])
def test_a_pipeline_run_logs_no_source_uid(tmp_path: Path, third_party_level: str) -> None:
    """ivim on a small phantom: at the default level no source UID is logged; at INFO highdicom would log them."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-c", _IVIM_RUN, str(tmp_path / "study"), third_party_level],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    uids = set()
    for path in (tmp_path / "study").rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID}
    assert uids
    leaked = {u for u in uids if u in r.stderr}
    if third_party_level == "WARNING":
        assert not leaked, f"{len(leaked)} source UID(s) logged:\n{r.stderr[-3000:]}"
    else:  # the premise of the default: highdicom narrates the source instances it copies from
        assert leaked and "highdicom" in r.stderr


# ---------------------------------------------------------------- exposure
@pytest.mark.parametrize(
    "gateway, metrics, expected",
    [
        ({}, {}, ["DICOM listener"]),  # the built-in defaults
        ({"host": "::"}, {}, ["DICOM listener"]),
        ({"allow_hosts": ["10.20.0.0/16"]}, {}, []),
        ({"allow_ae": ["MRI_3T"]}, {}, []),
        ({"host": "127.0.0.1"}, {}, []),
        ({"host": "127.0.0.1"}, {"host": "0.0.0.0"}, ["/metrics"]),
        ({"host": "127.0.0.1"}, {"host": "0.0.0.0", "auth": "bearer", "credential_file": "/run/x"}, []),
        ({"host": "127.0.0.1"}, {"host": "::1"}, []),
        ({"host": "127.0.0.1"}, {"host": "0.0.0.0", "enabled": False}, []),
    ],
)
def test_exposure_warnings(gateway: dict[str, object], metrics: dict[str, object], expected: list[str]) -> None:
    cfg = Config.model_validate({"gateway": gateway, "metrics": MetricsSettings(**metrics).model_dump()})
    found = exposure_warnings(cfg)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found)), found
    for text in found:  # each names the keys that close it
        assert "allow_hosts" in text or "auth" in text


def test_open_listener_warns_once_in_the_log_and_on_stderr(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.service"):
        _warn_exposure(Config())
    (record,) = [r for r in caplog.records if "open to the network" in r.getMessage()]
    assert "allow_hosts" in record.getMessage() and "allow_ae" in record.getMessage()
    assert capsys.readouterr().err.count("open to the network") == 1
    caplog.clear()
    _warn_exposure(Config.model_validate({"gateway": {"allow_hosts": ["10.0.0.0/8"]}}))
    assert not caplog.records and not capsys.readouterr().err
