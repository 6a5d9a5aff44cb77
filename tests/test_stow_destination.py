"""Results over STOW-RS to a real Orthanc (DICOMweb plugin): delivery, retries, dead letters, auth.

Faults come from a small loopback HTTP proxy in front of the real Orthanc
(:class:`FaultProxy`): it answers chosen statuses to the first requests, or to
all while told so, and passes everything else through untouched. Orthanc
itself is never mocked; its answers to real requests decide the rest.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from gateway.config import ConfigError, Destination, DestinationType, load_config
from gateway.index import SendRow, SendState
from gateway.stow import InstanceOutcome, StowClient, StowItem, _per_instance, parse_retry_after
from tests.conftest import GatewayProcess, Orthanc, mr_series, storescu, wait_for

pytestmark = pytest.mark.peers


class FaultProxy:
    """A loopback HTTP proxy to one upstream that can answer errors in its place.

    ``fail_first`` lists statuses for the next requests, one each (``Retry-After``
    goes with them when ``retry_after`` is set); while ``fail_all`` is set every
    request gets that status. The proxy always reads the whole request body
    first, as a well-behaved server does, and records what each request looked like.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fail_first: list[int] = []
        self.fail_all: int | None = None
        self.retry_after: str | None = None
        self.requests: list[dict[str, Any]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.requests.append(
                    {
                        "time": time.monotonic(),
                        "path": self.path,
                        "content_type": self.headers.get("Content-Type", ""),
                        "content_length": self.headers.get("Content-Length"),
                        "transfer_encoding": self.headers.get("Transfer-Encoding"),
                        "authorization": self.headers.get("Authorization"),
                        "bytes": len(body),
                    }
                )
                status = proxy.fail_first.pop(0) if proxy.fail_first else proxy.fail_all
                if status is not None:
                    self.send_response(status)
                    if proxy.retry_after:
                        self.send_header("Retry-After", proxy.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                try:
                    fwd = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                    up.request("POST", self.path, body=body, headers=fwd)
                    rsp = up.getresponse()
                    data = rsp.read()
                finally:
                    up.close()
                self.send_response(rsp.status)
                self.send_header("Content-Type", rsp.getheader("Content-Type") or "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(orthanc: Orthanc) -> Iterator[FaultProxy]:
    p = FaultProxy(orthanc.http_port)
    try:
        yield p
    finally:
        p.close()


def _dicomweb(name: str, url: str, **extra: Any) -> str:
    """A ``[[destinations]]`` table of type dicomweb, as TOML."""
    lines = [f'name = "{name}"', 'type = "dicomweb"', f'url = "{url}"'] + [
        f"{k} = {json.dumps(v)}" for k, v in extra.items()
    ]
    return "\n[[destinations]]\n" + "\n".join(lines) + "\n"


def _sends(gw: GatewayProcess, destination: str | None = None) -> list[SendRow]:
    """The sends of every job, oldest first, optionally of one destination only."""
    idx = gw.index()
    try:
        rows = [s for j in idx.list_jobs(limit=1000) for s in idx.sends_for_job(j.id)]
    finally:
        idx.close()
    return sorted((s for s in rows if destination in (None, s.destination)), key=lambda s: s.id)


def _states(gw: GatewayProcess, destination: str | None = None) -> list[str]:
    return [s.state for s in _sends(gw, destination)]


def _run_series(gw: GatewayProcess, folder: Path, n: int, seed: int) -> None:
    r = storescu(gw.port, mr_series(folder, n=n, seed=seed))
    assert r.returncode == 0, r.stderr


def test_results_arrive_bit_exact_in_batches(
    tmp_path: Path,
    orthanc: Orthanc,
    proxy: FaultProxy,
    make_gateway: Callable[..., GatewayProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIGW_TEST_STOW_TOKEN", "tok-123")
    gw = make_gateway(extra_toml=_dicomweb("web", proxy.url(), batch_size=3, token_env="AIGW_TEST_STOW_TOKEN"))
    _run_series(gw, tmp_path / "in", n=4, seed=21)
    wait_for(lambda: _states(gw) == ["sent"] * 4, 60, "four results sent over STOW-RS")
    sends = _sends(gw)
    assert all(s.attempts == 1 for s in sends)
    # batch_size 3: two requests (3 + 1), each a streamed multipart/related body with a length.
    assert len(proxy.requests) == 2
    for req in proxy.requests:
        assert req["path"] == "/dicom-web/studies"
        assert req["content_type"].startswith('multipart/related; type="application/dicom"; boundary=')
        assert req["transfer_encoding"] is None and int(req["content_length"]) == req["bytes"]
        assert req["authorization"] == "Bearer tok-123"
    # Orthanc stores the bytes it was sent: compare with the result files.
    for s in sends:
        stored = orthanc.file(orthanc.lookup(s.sop_instance_uid, "Instance"))
        assert stored == Path(s.path).read_bytes()
        ds = dcmread(s.path)
        assert ds.SOPInstanceUID == s.sop_instance_uid and ds.ImageType[0] == "DERIVED"
    m = gw.metrics()
    assert m['aigw_send_attempts_total{destination="web",outcome="sent"}'] == 4
    assert m['aigw_send_attempts_total{destination="web",outcome="retry"}'] == 0
    assert "tok-123" not in gw.log()


def test_503_is_retried_after_retry_after_then_delivered(
    tmp_path: Path, orthanc: Orthanc, proxy: FaultProxy, make_gateway: Callable[..., GatewayProcess]
) -> None:
    # The test config's backoff is 0.5 s then 1 s; Retry-After: 2 must stretch both waits.
    proxy.fail_first = [503, 503]
    proxy.retry_after = "2"
    gw = make_gateway(extra_toml=_dicomweb("web", proxy.url()))
    _run_series(gw, tmp_path / "in", n=2, seed=23)
    wait_for(lambda: _states(gw) == ["sent", "sent"], 60, "results delivered after two 503s")
    assert len(proxy.requests) == 3, "one request per attempt: the batch is not split on failure"
    times = [r["time"] for r in proxy.requests]
    assert min(b - a for a, b in zip(times, times[1:])) >= 1.9, "Retry-After not honoured"
    assert all(s.attempts == 3 for s in _sends(gw))
    assert sorted(orthanc.instance_uids()) == sorted(s.sop_instance_uid for s in _sends(gw))
    m = gw.metrics()
    assert m['aigw_send_attempts_total{destination="web",outcome="retry"}'] == 4
    assert m['aigw_send_attempts_total{destination="web",outcome="sent"}'] == 2


def test_400_goes_to_deadletter_and_replays(
    tmp_path: Path, orthanc: Orthanc, proxy: FaultProxy, make_gateway: Callable[..., GatewayProcess]
) -> None:
    proxy.fail_all = 400
    gw = make_gateway(extra_toml=_dicomweb("web", proxy.url()))
    _run_series(gw, tmp_path / "in", n=2, seed=25)
    wait_for(lambda: _states(gw) == ["dead", "dead"], 60, "two dead letters")
    sends = _sends(gw)
    assert all(s.attempts == 1 for s in sends), "a 400 must not be retried"
    assert all(s.error == "destination answered HTTP 400 Bad Request" for s in sends)
    out = gw.cli("deadletter", "list")
    assert out.returncode == 0 and "HTTP 400 Bad Request" in out.stdout
    assert gw.metrics()['aigw_send_attempts_total{destination="web",outcome="dead"}'] == 2
    assert orthanc.instance_uids() == []
    proxy.fail_all = None  # the PACS is fixed; the operator replays
    r = gw.cli("deadletter", "retry", "--all")
    assert r.returncode == 0 and "2 send(s) queued again" in r.stdout
    wait_for(lambda: _states(gw) == ["sent", "sent"], 60, "replayed sends delivered")
    assert sorted(orthanc.instance_uids()) == sorted(s.sop_instance_uid for s in sends)


def test_wrong_password_is_permanent_right_one_delivers(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    pacs = Orthanc(tmp_path / "pacs", users={"aigw": "s3cret-pw"}, dicomweb=True).start()
    try:
        monkeypatch.setenv("AIGW_TEST_GOOD_PW", "s3cret-pw")
        monkeypatch.setenv("AIGW_TEST_BAD_PW", "not-the-pw")
        url = f"{pacs.url}/dicom-web"
        gw = make_gateway(
            extra_toml=_dicomweb("good", url, username="aigw", password_env="AIGW_TEST_GOOD_PW")
            + _dicomweb("bad", url, username="aigw", password_env="AIGW_TEST_BAD_PW")
        )
        _run_series(gw, tmp_path / "in", n=2, seed=27)
        wait_for(
            lambda: _states(gw, "good") == ["sent", "sent"] and _states(gw, "bad") == ["dead", "dead"],
            60,
            "good sent, bad dead-lettered",
        )
        bad = _sends(gw, "bad")
        assert all(s.attempts == 1 and s.error == "destination answered HTTP 401 Unauthorized" for s in bad)
        good = _sends(gw, "good")
        assert sorted(pacs.instance_uids()) == sorted(s.sop_instance_uid for s in good), "each result once"
        assert "s3cret-pw" not in gw.log() and "not-the-pw" not in gw.log()
    finally:
        pacs.stop(graceful=False)


def test_a_bad_part_fails_alone(tmp_path: Path, orthanc: Orthanc, proxy: FaultProxy) -> None:
    # Orthanc 1.10 stores the readable parts of a batch and answers 400 for the
    # whole request: the client splits the batch to classify each instance.
    files = mr_series(tmp_path / "in", n=2, seed=29)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file" * 64)
    items = [StowItem(str(dcmread(f).SOPInstanceUID), f) for f in files]
    dest = Destination(name="web", type=DestinationType.DICOMWEB, url=proxy.url(), batch_size=3)
    client = StowClient(dest, timeout=10)
    result = client.store([items[0], StowItem("2.25.999", junk), items[1]])
    assert not result.batch_failed
    assert [result.outcomes[it.sop_instance_uid].state for it in items] == [SendState.SENT, SendState.SENT]
    assert result.outcomes["2.25.999"] == InstanceOutcome(
        SendState.DEAD, None, "destination answered HTTP 400 Bad Request"
    )
    assert [r["bytes"] > 0 for r in proxy.requests] == [True] * 4, "the batch, then each instance on its own"
    # Resending an instance already stored is idempotent: same SOP Instance UID, one copy.
    assert sorted(orthanc.instance_uids()) == sorted(it.sop_instance_uid for it in items)
    gone = StowItem("2.25.998", tmp_path / "deleted.dcm")
    out = client.store([items[0], gone]).outcomes
    assert (
        out["2.25.998"].state == SendState.DEAD
        and out["2.25.998"].reason == "output file unreadable: FileNotFoundError"
    )
    assert out[items[0].sop_instance_uid].state == SendState.SENT


def test_connection_refused_is_transient_and_pauses(tmp_path: Path) -> None:
    from gateway.apps.viewer import free_port

    f = mr_series(tmp_path / "in", n=1, seed=31)[0]
    dest = Destination(name="web", type=DestinationType.DICOMWEB, url=f"http://127.0.0.1:{free_port()}/dicom-web")
    result = StowClient(dest, timeout=5).store([StowItem("2.25.1", f)])
    assert result.batch_failed and result.outcomes["2.25.1"].state is None
    assert result.outcomes["2.25.1"].reason == "STOW-RS request failed: ConnectionRefusedError"


def test_missing_credential_variable_is_permanent(tmp_path: Path) -> None:
    f = mr_series(tmp_path / "in", n=1, seed=33)[0]
    dest = Destination(name="web", type=DestinationType.DICOMWEB, url="http://127.0.0.1:9/x", token_env="NO_SUCH_VAR")
    out = StowClient(dest, timeout=5, environ={}).store([StowItem("2.25.1", f)]).outcomes["2.25.1"]
    assert out.state == SendState.DEAD and out.reason == "environment variable NO_SUCH_VAR (token_env) is not set"


def _seq(tag: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {tag: {"vr": "SQ", "Value": items}}


def _ref(uid: str, tag: str | None = None, code: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if tag:
        item[tag] = {"vr": "US", "Value": [code]}
    return item


def test_failure_reasons_classified_like_cstore_statuses() -> None:
    # A Store Instances Response (PS3.18 10.5.3) as application/dicom+json (PS3.18 F.2).
    doc = _seq(
        "00081198", [_ref("1", "00081197", 0xA700), _ref("2", "00081197", 0xC000), _ref("3", "00081197", 0x0110)]
    )
    doc |= _seq("00081199", [_ref("4", "00081196", 0xB000), _ref("5")])
    out = _per_instance(["1", "2", "3", "4", "5", "6"], 202, doc).outcomes
    assert out["1"].state is None and out["1"].status == 0xA700  # out of resources: retried
    assert (
        out["2"].state == SendState.DEAD and out["2"].reason == "destination failed the instance: FailureReason 0xC000"
    )
    assert out["3"].state == SendState.DEAD
    assert out["4"].state == SendState.SENT and out["4"].status == 0xB000  # stored with a warning
    assert out["5"].state == SendState.SENT and out["5"].status is None
    assert out["6"].state is None  # in neither list after a 202
    conflict = _per_instance(["1", "6"], 409, doc).outcomes
    assert conflict["1"].state is None and conflict["6"].state == SendState.DEAD
    assert _per_instance(["7"], 200, None).outcomes["7"].state == SendState.SENT  # 200 without a body


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 29 <= (parse_retry_after(formatdate(now + 30, usegmt=True), now=now) or 0) <= 31


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('type = "dicomweb"\nurl = "http://pacs/dicom-web"\nport = 104', "port: not a key of a dicomweb destination"),
        (
            'ae_title = "PACS"\nhost = "pacs"\nport = 104\nurl = "http://pacs/x"',
            "url: not a key of a dimse destination",
        ),
        ('type = "dicomweb"', "a dicomweb destination needs url"),
        ('type = "dicomweb"\nurl = "http://u:p@pacs/dicom-web"', "no credentials in the url"),
        ('type = "dicomweb"\nurl = "http://pacs/x"\nusername = "aigw"', "needs both username and password_env"),
        ('type = "dicomweb"\nurl = "http://pacs/x"\nca_file = "/ca.pem"', "apply to an https:// url only"),
        ('type = "stow"\nurl = "http://pacs/x"', "destinations[0].type: Input should be 'dimse' or 'dicomweb'"),
        ('host = "pacs"\nport = 104', "a dimse destination needs ae_title"),
    ],
)
def test_bad_destination_is_refused_with_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "aigw.toml"
    path.write_text(f'[[destinations]]\nname = "d"\n{table}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).startswith(f"{path}: destinations[0]") and message in str(err.value)


def test_config_check_prints_the_error_and_keeps_old_configs(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(extra_toml=_dicomweb("web", "http://127.0.0.1:1/dicom-web", port=8042), start=False)
    r = gw.cli("config", "check")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "destinations[0]: port: not a key of a dicomweb destination" in r.stderr
    old = make_gateway(destinations=["PACS@127.0.0.1:104"], start=False)  # no type: dimse, as before
    r = old.cli("config", "check")
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout.split("# pipelines")[0].split("\n", 1)[1])["destinations"]
    assert d["type"] == "dimse" and d["ae_title"] == "PACS"
    web = load_config(
        None, {"destinations": [Destination(name="w", type=DestinationType.DICOMWEB, url="https://h/dw")]}, {}
    )
    assert web.destinations[0].ae_title is None and web.destinations[0].verify
