"""DICOM TLS (PS3.15 B.9, the BCP 195 TLS Secure Transport Connection Profile): SSL contexts.

PS3.15 B.9 asks for TLS 1.2 or later with the cipher suites RFC 9325 (BCP
195) recommends; older versions and suites without forward secrecy or
authenticated encryption are refused. The listener's context comes from
:func:`server_context` (the front door does the handshake, within ARTIM),
the sender's from :func:`client_context` (pynetdicom's ``tls_args``).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from gateway.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from gateway.config import Destination, ListenerTLS

__all__ = ["BCP195_CIPHERS", "TLSSetupError", "client_context", "server_context"]

#: TLS 1.2 suites of RFC 9325 4.2 (ECDHE or DHE key exchange, AEAD only);
#: TLS 1.3 suites are not set by this string and are all acceptable.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


class TLSSetupError(ConfigError):
    """A certificate, key or CA file that cannot be used; the message names the key and the file."""


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 at least and BCP 195 ciphers (PS3.15 B.9)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    return ctx


def _load(what: str, path: Path, load: Callable[[], None]) -> None:
    """Run ``load``; a failure becomes a :class:`TLSSetupError` naming ``what`` and ``path``."""
    try:
        load()
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise TLSSetupError(f"{what} = '{path}': cannot be used ({reason})") from None


def server_context(
    settings: ListenerTLS,
    section: str = "gateway.tls",
    keys: tuple[str, str, str] = ("cert_file", "key_file", "ca_file"),
) -> ssl.SSLContext:
    """A listener's SSL context: our certificate, and client certificates checked against ``ca_file``.

    ``section`` and ``keys`` (certificate, key, CA) name the configuration in
    error messages: the DICOM TLS port (``gateway.tls``) and the DICOMweb port
    (``dicomweb``, whose keys are ``tls_cert``, ``tls_key``, ``tls_ca_file``) share this context.

    Raises
    ------
    TLSSetupError
        A file is missing, unreadable or not a matching PEM certificate and key.
    """
    ctx = _harden(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    _load(
        f"{section}.{keys[0]} / {keys[1]}",
        settings.cert_file,
        lambda: ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file)),
    )
    if settings.ca_file is not None:
        ca = settings.ca_file
        _load(f"{section}.{keys[2]}", ca, lambda: ctx.load_verify_locations(cafile=str(ca)))
        # A certificate is asked for; without require_client_cert a client may
        # still go without one, but one that does not verify fails the handshake.
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(dest: Destination) -> tuple[ssl.SSLContext, str]:
    """pynetdicom's ``tls_args`` for a destination: a verifying context and the name to check.

    The server's certificate must chain to ``ca_file`` (the system's CAs
    without it) and carry ``server_name`` (default: ``host``).

    Raises
    ------
    TLSSetupError
        A file is missing, unreadable or not a PEM certificate, key or CA.
    """
    where = f"destinations[{dest.name}]"
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if dest.ca_file is not None:
        ca = dest.ca_file
        _load(f"{where}.ca_file", ca, lambda: ctx.load_verify_locations(cafile=str(ca)))
    if dest.cert_file is not None and dest.key_file is not None:
        cert, key = dest.cert_file, dest.key_file
        _load(f"{where}.cert_file / key_file", cert, lambda: ctx.load_cert_chain(str(cert), str(key)))
    assert dest.host is not None  # dimse: validated
    return _harden(ctx), dest.server_name or dest.host
