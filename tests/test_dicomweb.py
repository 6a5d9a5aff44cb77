"""The DICOMweb STOW-RS receiver (PS3.18 10.5) against real clients: Orthanc's
DICOMweb plugin, dicomweb-client and raw HTTP from http.client, with the same
guarantees as C-STORE: acknowledged means durable, stored means bit-exact,
nothing half-written is indexed."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.config import ConfigError, load_config
from gateway.dicomweb import FAILURE_REASON_FOR_REFUSAL, FailureReason, hash_token
from gateway.dicomweb.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart
from gateway.dicomweb.server import common_name
from gateway.ingest import RefusalReason
from tests.conftest import REPO, GatewayProcess, Orthanc, free_port, mr_series, storescu, wait_for
from tests.pki import PKI

TOKEN = "stow-test-token-0123456789"
OTHER_TOKEN = "a-token-of-a-source-not-in-allow-ae"
BOUNDARY = "aigw-test-boundary-7c1e"


def dicomweb_toml(port: int, **extra: Any) -> str:
    lines = [
        "[dicomweb]",
        "enabled = true",
        'host = "127.0.0.1"',
        f"port = {port}",
        *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
        "[[dicomweb.tokens]]",
        'source = "RIS"',
        f'sha256 = "{hash_token(TOKEN)}"',
        "[[dicomweb.tokens]]",
        'source = "INTRUDER"',
        f'sha256 = "{hash_token(OTHER_TOKEN)}"',
    ]
    return "\n".join(lines) + "\n"


def start_gateway(root: Path, models_dir: Path, **dicomweb: Any) -> tuple[GatewayProcess, int]:
    port = free_port()
    gw = GatewayProcess(root, models_dir, dicomweb_toml(port, **dicomweb), gateway={"allow_ae": ["RIS", "SCANNER"]})
    return gw.start(), port


@pytest.fixture(scope="module")
def stow_gateway(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[GatewayProcess, int]]:
    """One gateway with STOW-RS on for the tests that only add instances of their own."""
    gw, port = start_gateway(tmp_path_factory.mktemp("stowgw"), models_dir)
    try:
        yield gw, port
    finally:
        gw.stop()


def multipart(parts: Iterable[bytes], ctype: str = "application/dicom") -> bytes:
    out = b"preamble, ignored\r\n"
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def stow(
    port: int,
    body: bytes | Iterable[bytes],
    token: str | None = TOKEN,
    study: str | None = None,
    content_type: str | None = None,
    timeout: float = 120,
    tls_ca: Path | str | None = None,
    client_cert: tuple[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST a STOW-RS request with http.client; an iterable body goes chunked.

    With ``tls_ca``: HTTPS trusting that CA, presenting ``client_cert`` (certificate, key) if given.
    """
    headers = {"Content-Type": content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn: http.client.HTTPConnection
    if tls_ca:
        context = ssl.create_default_context(cafile=str(tls_ca))
        if client_cert is not None:
            context.load_cert_chain(*client_cert)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        path = "/studies" + (f"/{study}" if study else "")
        conn.request("POST", path, body=body, headers=headers, encode_chunked=not isinstance(body, bytes))
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def dataset_bytes(path: Path | bytes) -> bytes:
    """The data set of a Part 10 file, after its File Meta Information (whose group length says where it ends)."""
    raw = path if isinstance(path, bytes) else path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def seq(body: bytes, tag: str) -> list[dict[str, Any]]:
    return list(json.loads(body).get(tag, {}).get("Value", []))


def item_uid(item: dict[str, Any]) -> str | None:
    v = item["00081155"].get("Value")
    return str(v[0]) if v else None


def incoming(gw: GatewayProcess) -> list[str]:
    return sorted(p.name for p in (gw.data_dir / "incoming").iterdir())


def counted(gw: GatewayProcess, outcome: str, transport: str = "dicomweb") -> float:
    return gw.metrics()[f'aigw_instances_received_total{{outcome="{outcome}",transport="{transport}"}}']


def http_count(gw: GatewayProcess, code: int) -> float:
    return gw.metrics()[f'aigw_http_requests_total{{code="{code}"}}']


# ------------------------------------------------------------------ parser
def test_multipart_parser_finds_delimiters_across_any_chunk_edge() -> None:
    """Content that nearly holds the delimiter, fed 1, 7 and 4096 bytes at a time, comes back exact."""
    rng = __import__("random").Random(7)
    contents = [
        b"",
        b"\r\n--" + BOUNDARY.encode()[:-1] + b"X",  # a near-delimiter inside the content
        bytes(rng.randrange(256) for _ in range(20000)) + b"\r\n--",
        b"--" + BOUNDARY.encode(),  # the boundary without its CRLF is content
    ]
    body = multipart(contents)
    for size in (1, 7, 4096, len(body)):
        parser = MultipartParser(BOUNDARY.encode())
        got: list[bytearray] = []
        types = []
        for i in range(0, len(body), size):
            for ev in parser.feed(body[i : i + size]):
                if isinstance(ev, PartStart):
                    got.append(bytearray())
                    types.append(ev.headers["content-type"])
                elif isinstance(ev, PartData):
                    got[-1] += ev.data
                else:
                    assert isinstance(ev, PartEnd)
        parser.close()
        assert [bytes(g) for g in got] == contents, f"chunk size {size}"
        assert types == ["application/dicom"] * len(contents)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"--B\r\nContent-Type: application/dicom\r\n\r\nabc", "without the closing delimiter"),
        (b"no delimiter at all", "before the first part"),
        (b"--Bjunk\r\n", "followed by CRLF"),
        (b"--B\r\nno colon here\r\n\r\nx\r\n--B--", "malformed part header"),
    ],
)
def test_multipart_parser_refuses_malformed_bodies(body: bytes, message: str) -> None:
    parser = MultipartParser(b"B")
    with pytest.raises(MultipartError, match=message):
        parser.feed(body)
        parser.close()


# ------------------------------------------------------------ conformance
def test_failure_reason_table_matches_conformance_statement() -> None:
    """docs/conformance.md Table 5-6 lists exactly the Failure Reason answered for each refusal."""
    from tests.test_conformance import doc_table

    documented: dict[RefusalReason, int] = {}
    for row in doc_table("stow-failure-reasons"):
        hexcode, decimal = row["Failure Reason"].split()
        assert int(hexcode, 16) == int(decimal.strip("()")), f"{row['Refusal']}: hex and decimal disagree"
        assert FailureReason(int(hexcode, 16)), "not a Failure Reason of PS3.18 Table I.2-2"
        documented[RefusalReason[row["Refusal"]]] = int(hexcode, 16)
    assert documented == {r: int(f) for r, f in FAILURE_REASON_FOR_REFUSAL.items()}
    assert set(FAILURE_REASON_FOR_REFUSAL) == set(RefusalReason)


def test_config_validates_the_dicomweb_section(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[dicomweb]\nenabled = true\n")
    with pytest.raises(ConfigError, match="add tokens, certificates or allow_anonymous"):
        load_config(cfg, environ={})
    for body, message in [
        ('tls_ca_file = "ca.pem"\nallow_anonymous = true\n', "tls_ca_file needs tls_cert"),
        ("require_client_cert = true\nallow_anonymous = true\n", "need tls_ca_file"),
        ('allow_anonymous = true\n[[dicomweb.certificates]]\ncommon_name = "c"\nsource = "RIS"\n', "need tls_ca_file"),
    ]:
        cfg.write_text("[dicomweb]\nenabled = true\n" + body)
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, environ={})
    cfg.write_text('[dicomweb]\nenabled = true\n[[dicomweb.tokens]]\nsource = "RIS"\nsha256 = "secret"\n')
    with pytest.raises(ConfigError, match=r"dicomweb.tokens\[0\].sha256"):
        load_config(cfg, environ={})
    cfg.write_text('[dicomweb]\nenabled = true\ntls_cert = "c.pem"\nallow_anonymous = true\n')
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(cfg, environ={})
    cfg.write_text(f'[dicomweb]\nenabled = true\n[[dicomweb.tokens]]\nsource = "RIS"\nsha256 = "{hash_token("t")}"\n')
    assert load_config(cfg, environ={}).dicomweb.tokens[0].source == "RIS"


def test_cli_hash_token_reads_stdin() -> None:
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "dicomweb", "hash-token"],
        input=TOKEN + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(TOKEN.encode()).hexdigest()


# ------------------------------------------------------------ real peers
@pytest.mark.peers
def test_orthanc_stow_client_stores_bit_exact_with_the_token_source(
    tmp_path: Path, stow_gateway: tuple[GatewayProcess, int]
) -> None:
    """Orthanc's DICOMweb plugin as the STOW-RS client: every instance stored byte for byte, calling AE "RIS"."""
    gw, port = stow_gateway
    files = mr_series(tmp_path / "src", n=4, seed=41)
    servers = {"aigw": {"Url": f"http://127.0.0.1:{port}/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True, dicomweb_config={"Servers": servers}).start()
    try:
        before = counted(gw, "stored")
        uploaded = orthanc.upload(files)
        study = uploaded[0]["ParentStudy"]
        code, body = _orthanc_post(orthanc, "/dicom-web/servers/aigw/stow", {"Resources": [study]})
        assert code == 200, body[:500]
    finally:
        orthanc.stop(graceful=False)
    index = gw.index()
    for f in files:
        row = index.find_instance(sop_uid(f))
        assert row is not None, "an instance Orthanc sent is not in the index"
        assert row.calling_ae == "RIS", "the source name of the token is the calling AE"
        assert dataset_bytes(Path(row.path)) == dataset_bytes(f), "the stored data set differs from the source"
        assert row.sha256 == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
    assert counted(gw, "stored") == before + 4
    assert incoming(gw) == []


def _orthanc_post(orthanc: Orthanc, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", orthanc.http_port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.peers
def test_dicomweb_client_one_bad_part_gives_202(tmp_path: Path, stow_gateway: tuple[GatewayProcess, int]) -> None:
    """dicomweb-client sends three instances, one of a non-storage SOP class: two stored, one failed (0x0122)."""
    from dicomweb_client.api import DICOMwebClient

    gw, port = stow_gateway
    files = mr_series(tmp_path / "src", n=3, seed=42)
    datasets = [dcmread(f) for f in files]
    bad = datasets[1]
    bad.SOPClassUID = bad.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.1.20.1")  # Storage Commitment
    client = DICOMwebClient(f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"})
    before_202, before_invalid = http_count(gw, 202), counted(gw, "invalid")
    answer = client.store_instances(datasets)
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [
        str(datasets[0].SOPInstanceUID),
        str(datasets[2].SOPInstanceUID),
    ]
    (failed,) = answer.FailedSOPSequence
    assert str(failed.ReferencedSOPInstanceUID) == str(bad.SOPInstanceUID)
    assert failed.FailureReason == FailureReason.SOP_CLASS_NOT_SUPPORTED == 290
    assert http_count(gw, 202) == before_202 + 1
    assert counted(gw, "invalid") == before_invalid + 1
    index = gw.index()
    assert index.find_instance(str(bad.SOPInstanceUID)) is None
    for ds in (datasets[0], datasets[2]):
        assert index.find_instance(str(ds.SOPInstanceUID)) is not None
    assert incoming(gw) == []


@pytest.mark.peers
def test_unparseable_part_fails_alone_with_cannot_understand(
    tmp_path: Path, stow_gateway: tuple[GatewayProcess, int]
) -> None:
    gw, port = stow_gateway
    (good,) = mr_series(tmp_path / "src", n=1, seed=43)
    code, headers, body = stow(port, multipart([b"\x00not a dicom file" * 100, good.read_bytes()]))
    assert code == 202, body
    assert headers["content-type"] == "application/dicom+json"
    (failed,) = seq(body, "00081198")
    assert failed["00081197"]["Value"] == [FailureReason.CANNOT_UNDERSTAND] and item_uid(failed) is None
    assert [item_uid(i) for i in seq(body, "00081199")] == [sop_uid(good)]
    assert gw.index().find_instance(sop_uid(good)) is not None


@pytest.mark.peers
def test_same_uid_other_bytes_is_kept_aside_with_a_warning(
    tmp_path: Path, stow_gateway: tuple[GatewayProcess, int]
) -> None:
    """The same bytes again: 200, stored once. Other bytes under that UID: kept aside, 202 with WarningReason."""
    from gateway.dicomweb import WarningReason

    gw, port = stow_gateway
    (f,) = mr_series(tmp_path / "src", n=1, seed=50)
    assert stow(port, multipart([f.read_bytes()]))[0] == 200
    code, _, body = stow(port, multipart([f.read_bytes()]))
    assert code == 200 and "00081196" not in seq(body, "00081199")[0]
    ds = dcmread(f)
    ds.PixelData = bytes(len(ds.PixelData))
    other = tmp_path / "other.dcm"
    ds.save_as(other, enforce_file_format=True)
    before = counted(gw, "conflict")
    code, _, body = stow(port, multipart([other.read_bytes()]))
    assert code == 202, body
    (item,) = seq(body, "00081199")
    assert item_uid(item) == sop_uid(f) and item["00081196"]["Value"] == [WarningReason.CONFLICT_KEPT_ASIDE]
    assert counted(gw, "conflict") == before + 1
    kept = list((gw.data_dir / "conflicts").glob(f"{sop_uid(f)}.*.dcm"))
    assert len(kept) == 1 and kept[0].read_bytes() == other.read_bytes()


@pytest.mark.peers
def test_wrong_or_missing_token_is_401_and_stores_nothing(
    tmp_path: Path, stow_gateway: tuple[GatewayProcess, int]
) -> None:
    from dicomweb_client.api import DICOMwebClient
    from requests import HTTPError

    gw, port = stow_gateway
    (f,) = mr_series(tmp_path / "src", n=1, seed=44)
    before = http_count(gw, 401)
    for token in (None, "not-the-token"):
        code, headers, _ = stow(port, multipart([f.read_bytes()]), token=token)
        assert code == 401
        assert headers["www-authenticate"].startswith("Bearer")
    client = DICOMwebClient(f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(HTTPError) as err:
        client.store_instances([dcmread(f)])
    assert err.value.response is not None and err.value.response.status_code == 401
    # A valid token whose source is not in [gateway] allow_ae: allow-lists hold for HTTP too.
    code, _, _ = stow(port, multipart([f.read_bytes()]), token=OTHER_TOKEN)
    assert code == 403
    assert http_count(gw, 401) == before + 3
    assert gw.index().find_instance(sop_uid(f)) is None
    assert incoming(gw) == []


@pytest.mark.peers
def test_a_refusal_reaches_a_client_still_sending_its_body(stow_gateway: tuple[GatewayProcess, int]) -> None:
    """The 401 is answered at the headers; a client that sends its body anyway must still read it.

    Closing with the body unread would reset the connection: the client's
    send fails with EPIPE and the answer is lost (seen with plain clients).
    """
    _, port = stow_gateway
    body = multipart([b"\0" * (8 << 20)])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            (
                f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n\r\n'
            ).encode()
        )
        time.sleep(0.5)  # the answer is sent and the connection ends, all before the body is read
        s.sendall(body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401"), reply[:100]


@pytest.mark.peers
def test_study_in_the_url_refuses_parts_of_another_study(
    tmp_path: Path, stow_gateway: tuple[GatewayProcess, int]
) -> None:
    """``POST /studies/{study}`` (PS3.18 10.5.1): an instance of another study fails with 0xA900; none stored is 409."""
    gw, port = stow_gateway
    files = mr_series(tmp_path / "src", n=2, seed=45)
    their_study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    code, _, body = stow(port, multipart([f.read_bytes() for f in files]), study="2.25.987654321")
    assert code == 409, body
    failed = seq(body, "00081198")
    assert sorted(item_uid(i) or "" for i in failed) == sorted(sop_uid(f) for f in files)
    assert {i["00081197"]["Value"][0] for i in failed} == {FailureReason.DATASET_DOES_NOT_MATCH}
    assert all(gw.index().find_instance(sop_uid(f)) is None for f in files)
    # The same parts under their own study are stored.
    code, _, body = stow(port, multipart([f.read_bytes() for f in files]), study=their_study)
    assert code == 200, body
    assert len(seq(body, "00081199")) == 2
    # Not a UID in the path, or not multipart/related: the request itself is refused.
    assert stow(port, multipart([files[0].read_bytes()]), study="1.2.abc")[0] == 400
    assert stow(port, files[0].read_bytes(), content_type="application/dicom")[0] == 415
    assert stow(port, multipart([files[0].read_bytes()], ctype="application/dicom+json"))[0] == 415
    assert incoming(gw) == []


@pytest.mark.peers
def test_too_large_and_stalled_requests_leave_nothing(tmp_path: Path, models_dir: Path) -> None:
    """413 by Content-Length or while streaming, 408 on a stall: partial files removed, nothing indexed."""
    gw, port = start_gateway(tmp_path / "gw", models_dir, max_request_bytes=1 << 20, request_timeout_seconds=1.0)
    try:
        files = mr_series(tmp_path / "src", n=2, seed=46)
        big = multipart([f.read_bytes() for f in files] + [b"\0" * (1 << 20)])
        # Refused by Content-Length before the body is read. The client asks for 100-continue, as
        # large uploads should: a plain client's body would meet a closed socket (EPIPE) once the
        # early 413 is sent and the connection closed, and the kernel may then drop the 413 itself.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                (
                    f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n"
                    f"Expect: 100-continue\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n\r\n'
                ).encode()
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head_lines = reply.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
        assert head_lines[0].startswith(b"http/1.1 413"), reply[:100]
        assert b"connection: close" in head_lines
        # Chunked: no Content-Length, so the limit is found while the parts stream to disk.
        code, _, _ = stow(port, (big[i : i + 65536] for i in range(0, len(big), 65536)))
        assert code == 413
        assert incoming(gw) == []

        # A client that sends a part and a half, then stalls.
        head = (
            "POST /studies HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {TOKEN}\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n\r\n'
        ).encode()
        payload = multipart([files[0].read_bytes(), files[1].read_bytes()])
        half = payload[: len(payload) - 2000]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head + f"{len(half):x}\r\n".encode() + half + b"\r\n")
            wait_for(lambda: incoming(gw), 10, "the parts to reach incoming/")
            t0 = time.monotonic()
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            waited = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert waited < 10, "the stalled connection was not closed by the timeout"
        assert incoming(gw) == []
        index = gw.index()
        assert all(index.find_instance(sop_uid(f)) is None for f in files)
        assert http_count(gw, 413) == 2 and http_count(gw, 408) == 1
    finally:
        gw.stop()


@pytest.mark.peers
def test_slow_or_too_many_http_clients_cannot_lock_either_listener(tmp_path: Path, models_dir: Path) -> None:
    """Clients that connect and send their request head slowly (slowloris) are capped and timed out.

    Without that, each held a file descriptor for as long as it liked: with a
    service's usual limit of 1,024, 1,100 of them stopped C-STORE and STOW-RS alike.
    """
    gw, port = start_gateway(tmp_path / "gw", models_dir, max_connections=8, header_timeout_seconds=1.5)
    try:
        assert gw.proc is not None
        fds_before = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
        slow = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(b"POST /studies HTTP/1.1\r\nHost: x\r\n")  # and never the rest
                slow.append(s)
            time.sleep(0.5)
            # The first 8 are held; every later one was answered 503 and closed at once.
            assert len(os.listdir(f"/proc/{gw.proc.pid}/fd")) <= fds_before + 8 + 4
            assert slow[-1].recv(200).startswith(b"HTTP/1.1 503")
            # Meanwhile C-STORE is served as ever.
            files = mr_series(tmp_path / "src", n=2, seed=47)
            done = storescu(gw.port, files)
            assert done.returncode == 0, done.stderr
            # The held ones get 408 once their head is overdue, and are closed.
            t0 = time.monotonic()
            for s in slow[:8]:
                s.settimeout(10)
                reply = s.recv(200)
                assert reply.startswith(b"HTTP/1.1 408"), reply
            assert time.monotonic() - t0 < 5
        finally:
            for s in slow:
                s.close()
        # The receiver serves again, and counted what it refused.
        more = mr_series(tmp_path / "more", n=1, seed=48)
        code, _, _ = stow(port, multipart([more[0].read_bytes()]))
        assert code == 200
        assert http_count(gw, 503) == 192 and http_count(gw, 408) == 8
    finally:
        gw.stop()


@pytest.mark.peers
def test_https_with_the_configured_certificate(tmp_path: Path, models_dir: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    gw, port = start_gateway(tmp_path / "gw", models_dir, tls_cert=str(cert), tls_key=str(key), max_connections=4)
    try:
        (f, g) = mr_series(tmp_path / "src", n=2, seed=51)
        code, _, body = stow(port, multipart([f.read_bytes()]), tls_ca=cert)
        assert code == 200, body
        with pytest.raises(ConnectionError):  # plain HTTP to the TLS port gets no answer
            stow(port, multipart([f.read_bytes()]))
        assert gw.index().find_instance(sop_uid(f)) is not None
        # Connections that never start their TLS handshake count against max_connections
        # from the accept: they cannot use up the process's file descriptors either.
        assert gw.proc is not None
        fds_before = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
        try:
            time.sleep(0.5)
            assert len(os.listdir(f"/proc/{gw.proc.pid}/fd")) <= fds_before + 4 + 4
            assert stalled[-1].recv(100) == b"", "the one over the cap is closed at once"
            with pytest.raises((ConnectionError, ssl.SSLError)):
                stow(port, multipart([g.read_bytes()]), tls_ca=cert, timeout=10)
        finally:
            for s in stalled:
                s.close()
        # Their places come back when they go.
        code, _, body = wait_for(
            lambda: _stow_or_none(port, multipart([g.read_bytes()]), cert), 10, "a place for a new connection"
        )
        assert code == 200, body
        assert http_count(gw, 503) >= 37
    finally:
        gw.stop()


def _stow_or_none(port: int, body: bytes, ca: Path) -> tuple[int, dict[str, str], bytes] | None:
    try:
        return stow(port, body, tls_ca=ca, timeout=10)
    except (ConnectionError, ssl.SSLError):
        return None


@pytest.mark.peers
def test_client_certificates_authenticate_as_their_configured_source(
    tmp_path: Path, models_dir: Path, pki: PKI
) -> None:
    """Mutual TLS: a certificate from the CA whose CN is configured is a source; others are refused.

    ``client`` (CN "client", from the CA) is mapped to SCANNER; ``server`` is from
    the same CA but not mapped (403); ``stranger`` is from another CA (handshake
    refused); without a certificate the bearer token still works, and with neither
    the answer is 401. Orthanc's DICOMweb plugin, with the client certificate, is
    a second client.
    """
    port = free_port()
    toml = (
        dicomweb_toml(port, tls_cert=pki["server.pem"], tls_key=pki["server.key"], tls_ca_file=pki["ca.pem"])
        + '[[dicomweb.certificates]]\ncommon_name = "client"\nsource = "SCANNER"\n'
    )
    gw = GatewayProcess(tmp_path / "gw", models_dir, toml, gateway={"allow_ae": ["RIS", "SCANNER"]}).start()
    try:
        a, b, c, d, *by_orthanc = mr_series(tmp_path / "src", n=6, seed=57)
        code, _, body = stow(port, multipart([a.read_bytes()]), token=None, tls_ca=pki["ca.pem"],
                             client_cert=(pki["client.pem"], pki["client.key"]))  # fmt: skip
        assert code == 200, body
        row = gw.index().find_instance(sop_uid(a))
        assert row is not None and row.calling_ae == "SCANNER", "the certificate's source is the calling AE"

        code, _, body = stow(port, multipart([b.read_bytes()]), token=None, tls_ca=pki["ca.pem"],
                             client_cert=(pki["server.pem"], pki["server.key"]))  # fmt: skip
        assert code == 403, body
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the handshake refuses a certificate of another CA
            stow(port, multipart([c.read_bytes()]), token=None, tls_ca=pki["ca.pem"],
                 client_cert=(pki["stranger.pem"], pki["stranger.key"]))  # fmt: skip
        code, _, body = stow(port, multipart([c.read_bytes()]), token=None, tls_ca=pki["ca.pem"])
        assert code == 401, body
        code, _, body = stow(port, multipart([d.read_bytes()]), tls_ca=pki["ca.pem"])
        assert code == 200, body
        row = gw.index().find_instance(sop_uid(d))
        assert row is not None and row.calling_ae == "RIS", "a token still decides without a certificate"
        index = gw.index()
        assert index.find_instance(sop_uid(b)) is None and index.find_instance(sop_uid(c)) is None
        assert http_count(gw, 403) == 1 and http_count(gw, 401) == 1

        server = {
            "Url": f"https://127.0.0.1:{port}/",
            "CertificateFile": pki["client.pem"],
            "CertificateKeyFile": pki["client.key"],
        }
        orthanc = Orthanc(
            tmp_path / "orthanc",
            dicomweb=True,
            dicomweb_config={"Servers": {"aigw": server}},
            extra_config={"HttpsCACertificates": pki["ca.pem"], "HttpsVerifyPeers": True},
        ).start()
        try:
            study = orthanc.upload(by_orthanc)[0]["ParentStudy"]
            code, body = _orthanc_post(orthanc, "/dicom-web/servers/aigw/stow", {"Resources": [study]})
            assert code == 200, body[:500]
        finally:
            orthanc.stop(graceful=False)
        for f in by_orthanc:
            row = gw.index().find_instance(sop_uid(f))
            assert row is not None and row.calling_ae == "SCANNER"
            assert dataset_bytes(Path(row.path)) == dataset_bytes(f)
    finally:
        gw.stop()


def test_common_name_is_the_subject_s_only_cn() -> None:
    assert common_name({"subject": ((("organizationName", "H"),), (("commonName", "ris"),))}) == "ris"
    assert common_name({"subject": ((("commonName", "a"),), (("commonName", "b"),))}) is None
    assert common_name({"subject": ((("organizationName", "H"),),)}) is None
    assert common_name({}) is None


# ------------------------------------------------------- large and crash
def _big_instance(frames: int, rows: int = 1024, cols: int = 1024) -> tuple[bytes, int, str]:
    """Header of a multi-frame Secondary Capture whose Pixel Data (OW, defined length) follows; the sizes."""
    import io

    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid(prefix="2.25.")
    ds.StudyInstanceUID = generate_uid(prefix="2.25.")
    ds.SeriesInstanceUID = generate_uid(prefix="2.25.")
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    pixels = rows * cols * 2 * frames
    header = buf.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + pixels.to_bytes(4, "little")
    return header, pixels, str(ds.SOPInstanceUID)


def _vm_hwm_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.peers
@pytest.mark.slow
def test_a_300_mb_part_streams_to_disk_with_bounded_memory(tmp_path: Path, models_dir: Path) -> None:
    """A 300 MB part sent chunked by a generator: stored whole (sha256), the gateway's peak RSS grows < 64 MiB."""
    gw, port = start_gateway(tmp_path / "gw", models_dir)
    try:
        assert gw.proc is not None
        header, pixels, uid = _big_instance(frames=150)
        block = bytes(range(256)) * 4096  # 1 MiB
        digest = hashlib.sha256()

        def body() -> Iterator[bytes]:
            for piece in (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(), header):
                yield piece
            digest.update(header)
            left = pixels
            while left:
                piece = block[: min(left, len(block))]
                digest.update(piece)
                left -= len(piece)
                yield piece
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        stow(port, multipart([mr_series(tmp_path / "warm", n=1, seed=47)[0].read_bytes()]))  # warm-up
        hwm_before = _vm_hwm_kib(gw.proc.pid)
        t0 = time.monotonic()
        code, _, answer = stow(port, body(), timeout=600)
        elapsed = time.monotonic() - t0
        hwm_after = _vm_hwm_kib(gw.proc.pid)
        assert code == 200, answer
        row = gw.index().find_instance(uid)
        assert row is not None and row.size_bytes == len(header) + pixels
        assert row.sha256 == digest.hexdigest(), "the stored file is not what was sent"
        growth_mib = (hwm_after - hwm_before) / 1024
        print(f"300 MB STOW-RS part: {elapsed:.1f} s, VmHWM {hwm_before // 1024} -> {hwm_after // 1024} MiB")
        assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB for a 300 MB part"
    finally:
        gw.stop()


@pytest.mark.peers
def test_kill_9_mid_request_loses_nothing_acknowledged(tmp_path: Path, models_dir: Path) -> None:
    """Acknowledged instances survive kill -9; the cut request's client sees an error and nothing of it is kept."""
    gw, port = start_gateway(tmp_path / "gw", models_dir)
    try:
        acked = mr_series(tmp_path / "a", n=2, seed=48)
        code, _, _ = stow(port, multipart([f.read_bytes() for f in acked]))
        assert code == 200
        cut = mr_series(tmp_path / "b", n=1, seed=49)[0]
        header, pixels, big_uid = _big_instance(frames=50)
        sent = {"n": 0}

        def body() -> Iterator[bytes]:
            yield multipart([cut.read_bytes()]).rsplit(f"--{BOUNDARY}--".encode(), 1)[0]
            yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + header
            for _ in range(pixels // 65536):
                sent["n"] += 1
                if sent["n"] == 200:  # about 13 MB into the second part
                    wait_for(lambda: len(incoming(gw)) == 2, 10, "both parts to reach incoming/")
                    gw.kill9()
                yield b"\0" * 65536

        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            stow(port, body(), timeout=30)
        gw.start()  # same data dir, same config
        index = gw.index()
        for f in acked:
            row = index.find_instance(sop_uid(f))
            assert row is not None, "an acknowledged instance was lost"
            assert dataset_bytes(Path(row.path)) == dataset_bytes(f)
        assert index.find_instance(sop_uid(cut)) is None, "an unacknowledged part was indexed"
        assert index.find_instance(big_uid) is None
        assert incoming(gw) == [], "partial uploads outlived the restart"
    finally:
        gw.stop()
