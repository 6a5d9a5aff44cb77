"""Sending results over DICOMweb: the STOW-RS user agent (PS3.18 10.5).

One request stores a batch of instances: ``POST <url>/studies`` with a
``multipart/related; type="application/dicom"`` body (PS3.18 8.6.1.2), one
part per instance, each part the result's DICOM file (PS3.10) exactly as it is
on disk. The body is streamed from the files with a ``Content-Length`` known
in advance (their sizes), so a batch never sits in memory and a server that
does not take chunked uploads still gets it.

The response (PS3.18 10.5.3) says, per instance, what happened:
``ReferencedSOPSequence`` lists the stored ones (maybe with a WarningReason),
``FailedSOPSequence`` the others with a FailureReason, a DIMSE-style status
that :func:`gateway.scu.classify_status` classifies as it would a C-STORE
status. Whole-request failures are classified by HTTP status:

* 5xx, 408, 429, connection errors and timeouts: transient (``Retry-After``
  honoured, up to ``send.backoff_max_seconds``);
* any other 4xx (400, 401, 403, 404, 413, 415 ...), a TLS certificate that
  does not verify, a credential variable that is not set: permanent.

Nothing from the response body but the status codes goes into an error
message: a server may echo request content, and with it patient data.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config import Destination
from gateway.index import SendState

__all__ = ["InstanceOutcome", "StowClient", "StowItem", "StowResult", "parse_retry_after"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # a Store Instances Response for 1000 instances is far smaller
# Tags of the Store Instances Response Module (PS3.18 10.5.3.1), as in application/dicom+json (PS3.18 F.2).
_REFERENCED_SOP_SEQ = "00081199"
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
# HTTP statuses that PS3.18 10.5.3 and RFC 9110 give as "try again later".
_TRANSIENT_HTTP = {HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS}
# Whole-request refusals that may be about one part only: split the batch to find it.
_SPLIT_ON = {HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.UNPROCESSABLE_ENTITY}


@dataclass(frozen=True)
class StowItem:
    """One instance to store: its SOP Instance UID (to match the response) and its file."""

    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class InstanceOutcome:
    """What became of one instance of a request.

    ``state`` is ``SENT``, ``DEAD`` (permanent) or ``None`` (transient: retry).
    ``status`` is the response's FailureReason or WarningReason, when it gave one.
    """

    state: SendState | None
    status: int | None
    reason: str | None


@dataclass(frozen=True)
class StowResult:
    """The outcome of one STOW-RS request, per SOP Instance UID.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one
    with a transient failure; ``batch_failed`` is true when the request as a
    whole failed (no per-instance answer), so the sender can pause the destination.
    """

    outcomes: dict[str, InstanceOutcome]
    retry_after: float | None = None
    batch_failed: bool = False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _http_reason(code: int) -> str:
    """``HTTP 400 Bad Request``: the standard phrase, never the server's own text."""
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


class StowClient:
    """Stores batches of instances at one ``dicomweb`` destination.

    Parameters
    ----------
    dest : Destination
        A destination of type ``dicomweb``.
    timeout : float
        Connect and read timeout in seconds (the destination's ``timeout_seconds``
        wins when it sets one).
    environ : mapping, optional
        Where ``token_env`` and ``password_env`` are looked up (default ``os.environ``),
        at each request, so a rotated secret is used without a restart.
    """

    def __init__(self, dest: Destination, timeout: float, environ: Mapping[str, str] | None = None) -> None:
        if dest.url is None:
            raise ValueError(f"destination {dest.name!r} has no url")
        self.dest = dest
        self.timeout = dest.timeout_seconds or timeout
        self.environ = os.environ if environ is None else environ
        parts = urlsplit(dest.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/studies"

    def _auth_header(self) -> str | None:
        """The Authorization header value, or None without auth.

        Raises
        ------
        LookupError
            When the variable that holds the secret is not set.
        """
        d = self.dest
        if d.token_env:
            token = self.environ.get(d.token_env)
            if not token:
                raise LookupError(f"environment variable {d.token_env} (token_env) is not set")
            return f"Bearer {token}"
        if d.username and d.password_env:
            password = self.environ.get(d.password_env)
            if password is None:
                raise LookupError(f"environment variable {d.password_env} (password_env) is not set")
            return "Basic " + base64.b64encode(f"{d.username}:{password}".encode()).decode("ascii")
        return None

    def _connection(self) -> http.client.HTTPConnection:
        if not self._https:
            return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        ctx = ssl.create_default_context(cafile=str(self.dest.ca_file) if self.dest.ca_file else None)
        if not self.dest.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=ctx)

    def store(self, items: Sequence[StowItem]) -> StowResult:
        """POST one batch and classify every instance of it; never raises for a network or server failure."""
        try:
            auth = self._auth_header()
        except LookupError as exc:
            return _every([it.sop_instance_uid for it in items], SendState.DEAD, str(exc))
        unreadable: dict[str, InstanceOutcome] = {}
        sized: list[tuple[StowItem, int]] = []
        for it in items:
            try:
                sized.append((it, os.stat(it.path).st_size))
            except OSError as exc:
                unreadable[it.sop_instance_uid] = InstanceOutcome(
                    SendState.DEAD, None, f"output file unreadable: {type(exc).__name__}"
                )
        if not sized:
            return StowResult(unreadable)
        result, code = self._post(sized, auth)
        if code in _SPLIT_ON and len(sized) > 1:
            # A 400 for the whole request does not say which part it was for
            # (Orthanc 1.10 stores the good parts and still answers 400), so
            # each instance goes again on its own. Resending one that was
            # stored is harmless: same SOP Instance UID, same instance.
            parts = [self._post([x], auth)[0] for x in sized]
            result = StowResult(
                {uid: o for p in parts for uid, o in p.outcomes.items()},
                max((p.retry_after for p in parts if p.retry_after is not None), default=None),
                any(p.batch_failed for p in parts),
            )
        return StowResult(unreadable | result.outcomes, result.retry_after, result.batch_failed)

    def _post(self, sized: Sequence[tuple[StowItem, int]], auth: str | None) -> tuple[StowResult, int | None]:
        """One STOW-RS request; its classified result and the HTTP status (None: no answer)."""
        uids = [it.sop_instance_uid for it, _ in sized]
        boundary = uuid.uuid4().hex
        length = sum(size + len(_part_header(boundary)) + 2 for _, size in sized) + len(f"--{boundary}--\r\n")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
            "Accept": "application/dicom+json",
        }
        if auth:
            headers["Authorization"] = auth
        conn = self._connection()
        try:
            try:
                conn.request("POST", self._path, body=_body([it for it, _ in sized], boundary), headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # A server may answer (413, 401) and close before reading the
                # whole body; its answer is still worth reading.
                pass
            rsp = conn.getresponse()
            code = rsp.status
            retry_after = parse_retry_after(rsp.getheader("Retry-After"))
            body = rsp.read(_MAX_RESPONSE_BYTES)
            ctype = rsp.getheader("Content-Type") or ""
        except ssl.SSLCertVerificationError:
            why = "TLS certificate of the destination does not verify (see ca_file, verify)"
            return _every(uids, SendState.DEAD, why), None
        except (OSError, http.client.HTTPException) as exc:
            return _every(uids, None, f"STOW-RS request failed: {type(exc).__name__}"), None
        finally:
            conn.close()
        if code >= 500 or code in _TRANSIENT_HTTP:
            return _every(uids, None, f"destination answered {_http_reason(code)}", retry_after), code
        if code >= 300 and code != HTTPStatus.CONFLICT:
            return _every(uids, SendState.DEAD, f"destination answered {_http_reason(code)}"), code
        return _per_instance(uids, code, _json_or_none(body, ctype)), code


def _every(uids: Sequence[str], state: SendState | None, reason: str, retry_after: float | None = None) -> StowResult:
    """The same outcome for every instance of a request; a transient one pauses the destination."""
    return StowResult({u: InstanceOutcome(state, None, reason) for u in uids}, retry_after, batch_failed=state is None)


def _part_header(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def _body(items: Sequence[StowItem], boundary: str) -> Iterator[bytes]:
    """The multipart/related body, read from the files in chunks as http.client sends it."""
    for it in items:
        yield _part_header(boundary)
        with open(it.path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _json_or_none(body: bytes, ctype: str) -> dict[str, Any] | None:
    if not body or "json" not in ctype.lower():
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _items(doc: dict[str, Any] | None, tag: str) -> list[dict[str, Any]]:
    """The items of a sequence in a DICOM JSON data set (PS3.18 F.2.2), or []."""
    element = (doc or {}).get(tag)
    value = element.get("Value") if isinstance(element, dict) else None
    return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    value = element.get("Value") if isinstance(element, dict) else None
    return value[0] if isinstance(value, list) and value else None


def _per_instance(uids: Sequence[str], code: int, doc: dict[str, Any] | None) -> StowResult:
    """Classify each instance of a 200, 202 or 409 response (PS3.18 10.5.3).

    Stored are the instances the ReferencedSOPSequence lists; failed ones in
    the FailedSOPSequence are classified by their FailureReason. An instance
    in neither list is retried after a 200 or 202 (Orthanc 1.10 answers 200
    with both lists empty to a body it could not read), and permanent after a
    409 (none stored). Only a 200 without a readable body is taken at its word
    that all were stored.
    """
    from gateway.scu import classify_status  # here, not at the top: scu imports this module

    out: dict[str, InstanceOutcome] = {}
    for item in _items(doc, _FAILED_SOP_SEQ):
        uid, reason = _first(item, _REFERENCED_SOP_INSTANCE_UID), _first(item, _FAILURE_REASON)
        if uid not in uids:
            continue
        status = int(reason) if isinstance(reason, int) else None
        verdict = classify_status(status) if status is not None else SendState.DEAD
        why = (
            f"destination failed the instance: FailureReason 0x{status:04X}"
            if status is not None
            else ("destination failed the instance without a FailureReason")
        )
        # A "failure" with a success code is an inconsistent answer: try again.
        out[uid] = InstanceOutcome(None if verdict == SendState.SENT else verdict, status, why)
    for item in _items(doc, _REFERENCED_SOP_SEQ):
        uid, warning = _first(item, _REFERENCED_SOP_INSTANCE_UID), _first(item, _WARNING_REASON)
        if uid in uids and uid not in out:
            out[uid] = InstanceOutcome(SendState.SENT, int(warning) if isinstance(warning, int) else None, None)
    for uid in uids:
        if uid in out:
            continue
        if code == HTTPStatus.OK and doc is None:
            out[uid] = InstanceOutcome(SendState.SENT, None, None)
        elif code == HTTPStatus.CONFLICT:
            out[uid] = InstanceOutcome(SendState.DEAD, None, f"destination answered {_http_reason(code)}")
        else:
            out[uid] = InstanceOutcome(None, None, f"not acknowledged in the {_http_reason(code)} response")
    return StowResult(out)
