"""A throw-away PKI from ``openssl`` for the TLS tests (DICOM TLS and HTTPS).

``ca`` signs ``server``, ``client`` and ``expired``; ``rogue`` signs
``stranger``. Each leaf's subject CN is its name, with localhost and
127.0.0.1 as subject alternative names.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {args[0]}: {done.stderr}"


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
        "-days", "2", "-subj", f"/CN=aigw test {name}", cwd=folder,
    )  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, *, expired: bool = False) -> None:
    """A key and a certificate for localhost / 127.0.0.1 signed by ``ca``; ``expired``: valid in 2020 only."""
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    if not expired:
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=folder,
        )  # fmt: skip
        return
    # `x509 -req` of OpenSSL 3.0 cannot back-date; `openssl ca` can (-startdate / -enddate).
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("1000\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
    )
    _openssl(
        "ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key", "-in", f"{name}.csr",
        "-out", f"{name}.pem", "-notext", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", cwd=folder,
    )  # fmt: skip


@dataclass
class PKI:
    """The throw-away certificates: ``ca`` signs server, client and expired; ``rogue`` signs stranger."""

    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def make_pki(folder: Path) -> PKI:
    """Create the certificates in ``folder`` (``openssl`` must be on PATH)."""
    _ca(folder, "ca")
    _ca(folder, "rogue")
    _leaf(folder, "server", "ca")
    _leaf(folder, "client", "ca")
    _leaf(folder, "stranger", "rogue")
    _leaf(folder, "expired", "ca", expired=True)
    return PKI(folder)
