"""DICOM TLS (PS3.15 B.9) on loopback: DCMTK as scanner and as PACS, a throw-away CA from ``openssl``.

The gateway listens on a plain and a TLS port side by side. DCMTK's echoscu
and storescu (``+tls key cert``, ``+cf ca``) are the scanner; storescp
``+tls`` is the PACS the results go to over TLS. Orthanc with
``DicomTlsEnabled`` is a second peer in both roles: the PACS the results go
to, and a sender to the gateway's TLS port.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.apps.viewer import free_port
from gateway.config import Destination, ListenerTLS
from gateway.tls import TLSSetupError, client_context, server_context
from tests.conftest import GatewayProcess, Orthanc, mr_series, need, storescu, wait_for, wait_sent
from tests.pki import PKI

MakeGateway = Callable[..., GatewayProcess]


# ------------------------------------------------------------------ the peers
def echo(port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK's echoscu, with the TLS options given."""
    cmd = [need("echoscu"), "-aet", "SCANNER", "-aec", "AIGW", "-to", "5", "-ta", "5", "-td", "5", *tls]
    return subprocess.run([*cmd, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)


def tls_gateway(make_gateway: MakeGateway, pki: PKI, extra: str = "", **tls: object) -> tuple[GatewayProcess, int]:
    port = free_port()
    keys = {
        "port": port,
        "cert_file": pki["server.pem"],
        "key_file": pki["server.key"],
        "ca_file": pki["ca.pem"],
        **tls,
    }
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())  # JSON scalars are TOML
    gw = make_gateway(extra_toml=f"[gateway.tls]\n{table}\n{extra}", gateway={"artim_timeout_seconds": 3})
    return gw, port


def rejected(gw: GatewayProcess, label: str) -> float:
    return gw.metrics().get(f'aigw_associations_rejected_total{{reason="{label}"}}', 0.0)


# ---------------------------------------------------------------------- tests
def test_tls_listener_admits_good_clients_and_closes_bad_handshakes(
    make_gateway: MakeGateway, pki: PKI, tmp_path: Path
) -> None:
    gw, port = tls_gateway(make_gateway, pki, require_client_cert=True)
    client = ["+tls", pki["client.key"], pki["client.pem"], "+cf", pki["ca.pem"]]

    done = echo(port, *client)
    assert done.returncode == 0, f"C-ECHO over TLS failed: {done.stdout}{done.stderr}"
    sent = storescu(port, mr_series(tmp_path / "in", n=2), extra=client)
    assert sent.returncode == 0, f"C-STORE over TLS failed: {sent.stdout}{sent.stderr}"
    assert gw.metrics().get('aigw_instances_received_total{outcome="stored",transport="dimse"}', 0) == 2
    assert rejected(gw, "tls_handshake_failed") == 0

    bad = {
        "certificate from another CA": ["+tls", pki["stranger.key"], pki["stranger.pem"], "+cf", pki["ca.pem"]],
        "expired certificate": ["+tls", pki["expired.key"], pki["expired.pem"], "+cf", pki["ca.pem"]],
        "no client certificate (require_client_cert)": ["+tla", "+cf", pki["ca.pem"]],
        "plain DICOM on the TLS port": [],
    }
    for n, (what, options) in enumerate(bad.items(), start=1):
        start = time.monotonic()
        done = echo(port, *options)
        assert done.returncode != 0, f"{what}: C-ECHO succeeded"
        assert time.monotonic() - start < 5, f"{what}: not refused at once"
        wait_for(lambda n=n: rejected(gw, "tls_handshake_failed") == n, 5, f"{what}: counted")  # type: ignore[misc]
        # The listener still answers, on both ports.
        assert echo(port, *client).returncode == 0, f"after {what}: TLS listener does not answer"
        assert echo(gw.port).returncode == 0, f"after {what}: plain listener does not answer"

    # A client that does not trust our CA ends the handshake itself; counted too.
    done = echo(port, "+tls", pki["client.key"], pki["client.pem"], "+cf", pki["rogue.pem"])
    assert done.returncode != 0
    wait_for(lambda: rejected(gw, "tls_handshake_failed") == len(bad) + 1, 5, "untrusting client counted")
    refusals = [line for line in gw.log().splitlines() if "refused (tls_handshake_failed)" in line]
    assert refusals, "handshake failures are logged"
    assert len(refusals) <= 1, "logged once per peer and minute"
    assert "SCANNER" not in "".join(refusals)


def test_client_certificate_is_optional_without_require_client_cert(make_gateway: MakeGateway, pki: PKI) -> None:
    _, port = tls_gateway(make_gateway, pki, require_client_cert=False)
    done = echo(port, "+tla", "+cf", pki["ca.pem"])
    assert done.returncode == 0, f"anonymous-client TLS refused: {done.stdout}{done.stderr}"
    # A certificate that is offered must still verify.
    assert echo(port, "+tls", pki["stranger.key"], pki["stranger.pem"], "+cf", pki["ca.pem"]).returncode != 0


@pytest.fixture
def tls_pacs(pki: PKI, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp with TLS (client certificate required, from our CA)."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    cmd = [need("storescp"), "+tls", pki["server.key"], pki["server.pem"], "+cf", pki["ca.pem"]]
    proc = subprocess.Popen([*cmd, "-aet", "PACS", "-od", str(out), str(port)], stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert proc.poll() is None, f"storescp +tls exited: {proc.stderr.read() if proc.stderr else ''!r}"
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def tls_destination(port: int, pki: PKI, ca: str) -> str:
    """A dimse destination "pacs" with TLS, trusting ``ca`` and offering our client certificate."""
    return (
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        f'ca_file = "{pki[ca]}"\ncert_file = "{pki["client.pem"]}"\nkey_file = "{pki["client.key"]}"\n'
    )


def test_results_are_sent_to_a_tls_peer(
    make_gateway: MakeGateway, pki: PKI, tls_pacs: tuple[int, Path], tmp_path: Path
) -> None:
    port, out = tls_pacs
    gw = make_gateway(extra_toml=tls_destination(port, pki, "ca.pem"))
    sent = storescu(gw.port, mr_series(tmp_path / "in", n=2))
    assert sent.returncode == 0, sent.stderr
    files = wait_for(lambda: len(list(out.iterdir())) == 2 and list(out.iterdir()), 60, "results at the TLS peer")
    assert len(files) == 2
    # The peer writes each file before it answers: the gateway counts the send a moment later.
    assert wait_sent(gw, "pacs", 2) == 2


def test_untrusted_tls_peer_is_not_sent_to(
    make_gateway: MakeGateway, pki: PKI, tls_pacs: tuple[int, Path], tmp_path: Path
) -> None:
    port, out = tls_pacs
    gw = make_gateway(extra_toml=tls_destination(port, pki, "rogue.pem"))
    assert storescu(gw.port, mr_series(tmp_path / "in", n=1)).returncode == 0
    wait_for(
        lambda: gw.metrics().get('aigw_send_attempts_total{destination="pacs",outcome="retry"}', 0) >= 1,
        60,
        "a failed send, retried",
    )
    assert not list(out.iterdir()), "nothing reaches a peer whose certificate does not verify"


# ------------------------------------------------------------ Orthanc as peer
def tls_orthanc(pki: PKI, root: Path, gateway_tls_port: int | None = None) -> Orthanc:
    """Orthanc with DICOM TLS on its DICOM port (client certificates required), trusting our CA.

    Orthanc presents ``server.pem`` in both roles, as PACS and as the SCU that
    sends to the gateway's TLS port (modality ``aigw``).
    """
    extra: dict[str, object] = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": pki["server.pem"],
        "DicomTlsPrivateKey": pki["server.key"],
        "DicomTlsTrustedCertificates": pki["ca.pem"],
        "DicomTlsRemoteCertificateRequired": True,
    }
    if gateway_tls_port is not None:
        extra["DicomModalities"] = {
            "aigw": {"AET": "AIGW", "Host": "127.0.0.1", "Port": gateway_tls_port, "UseDicomTls": True}
        }
    return Orthanc(root, ae_title="PACS", dicomweb=False, extra_config=extra).start()


def test_results_reach_orthanc_over_tls(make_gateway: MakeGateway, pki: PKI, tmp_path: Path) -> None:
    pacs = tls_orthanc(pki, tmp_path / "orthanc")
    try:
        gw = make_gateway(extra_toml=tls_destination(pacs.dicom_port, pki, "ca.pem"))
        assert storescu(gw.port, mr_series(tmp_path / "in", n=2)).returncode == 0
        wait_for(lambda: len(pacs.instance_uids()) == 2, 60, "results in Orthanc over TLS")
        assert wait_sent(gw, "pacs", 2) == 2
        # Orthanc's port speaks TLS only: a plain association there fails.
        plain = subprocess.run(
            [need("echoscu"), "-aec", "PACS", "-to", "5", "-ta", "5", "127.0.0.1", str(pacs.dicom_port)],
            capture_output=True,
            timeout=30,
        )
        assert plain.returncode != 0
    finally:
        pacs.stop(graceful=False)


def test_orthanc_sends_to_the_gateway_over_tls(make_gateway: MakeGateway, pki: PKI, tmp_path: Path) -> None:
    gw, port = tls_gateway(make_gateway, pki, require_client_cert=True)
    pacs = tls_orthanc(pki, tmp_path / "orthanc", gateway_tls_port=port)
    try:
        code, body = pacs._http("POST", f"{pacs.url}/modalities/aigw/echo", b"{}")
        assert code == 200, f"C-ECHO from Orthanc over TLS: {code} {body[:200]!r}"
        ids = [r["ID"] for r in pacs.upload(mr_series(tmp_path / "in", n=2))]
        payload = json.dumps({"Resources": ids, "Synchronous": True}).encode()
        code, body = pacs._http("POST", f"{pacs.url}/modalities/aigw/store", payload)
        assert code == 200, f"C-STORE from Orthanc over TLS: {code} {body[:300]!r}"
        wait_for(
            lambda: gw.metrics().get('aigw_instances_received_total{outcome="stored",transport="dimse"}', 0) == 2,
            30,
            "two instances stored from Orthanc",
        )
        assert rejected(gw, "tls_handshake_failed") == 0
    finally:
        pacs.stop(graceful=False)


# ------------------------------------------------------------- configuration
def test_tls_settings_are_checked(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="require_client_cert needs ca_file"):
        ListenerTLS(cert_file=Path(pki["server.pem"]), key_file=Path(pki["server.key"]), require_client_cert=True)
    with pytest.raises(TLSSetupError, match=r"gateway.tls.cert_file / key_file = '.*nothere.pem'"):
        server_context(ListenerTLS(cert_file=tmp_path / "nothere.pem", key_file=Path(pki["server.key"])))
    with pytest.raises(TLSSetupError, match="cannot be used"):  # a key that is not the certificate's
        server_context(ListenerTLS(cert_file=Path(pki["server.pem"]), key_file=Path(pki["client.key"])))
    ctx = server_context(ListenerTLS(cert_file=Path(pki["server.pem"]), key_file=Path(pki["server.key"])))
    import ssl

    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert all("GCM" in c["name"] or "CHACHA20" in c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")

    base = {"name": "p", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ValueError, match="apply with tls = true only"):
        Destination(**base, ca_file=pki["ca.pem"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        Destination(**base, tls=True, cert_file=pki["client.pem"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a key of a dicomweb destination"):
        Destination(name="w", type="dicomweb", url="https://x/dicom-web", tls=True)  # type: ignore[arg-type]
    context, name = client_context(Destination(**base, tls=True, ca_file=pki["ca.pem"], server_name="pacs.local"))  # type: ignore[arg-type]
    assert name == "pacs.local" and context.check_hostname and context.minimum_version == ssl.TLSVersion.TLSv1_2
