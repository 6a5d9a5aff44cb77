"""The configuration schema: the one place that defines every setting.

Sources, from lowest to highest precedence:

1. the defaults below (a complete embedded configuration: SQLite and local
   folders under the data dir, local workers, automatic CPU/GPU choice);
2. a TOML file (``--config FILE``);
3. ``AIGW_*`` environment variables (for containers), see :data:`ENV_VARS`;
4. command-line flags of ``aigw serve``.

Every error names the file, the key path and the reason, for example
``gateway.toml: routes[1].conditions[0].regex: invalid regular expression``.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

__all__ = [
    "Condition",
    "Config",
    "ConfigError",
    "Destination",
    "DestinationType",
    "DeviceClass",
    "ENV_VARS",
    "LatePolicy",
    "MetricsAuth",
    "Route",
    "SelectorMode",
    "UnroutedPolicy",
    "load_config",
    "parse_destination",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, 16 chars


class ConfigError(ValueError):
    """The configuration is invalid; the message names file, key and reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae(value: str) -> str:
    v = value.strip()
    if not _AE_RE.match(v) or not v:
        raise ValueError("an AE title is 1 to 16 printable characters without backslash")
    return v


class LatePolicy(str, Enum):
    """What to do with instances that arrive after their series was processed."""

    REPROCESS = "reprocess"  # process the series again as a new version
    IGNORE = "ignore"  # store them, but do not process again


class DeviceClass(str, Enum):
    """The kind of worker a pipeline's jobs go to with the distributed executor (queue ``<prefix>.<class>``)."""

    CPU = "cpu"
    GPU = "gpu"


class UnroutedPolicy(str, Enum):
    """What to do with a complete series that no route matched."""

    KEEP = "keep"  # keep in the data dir, count it
    FORWARD = "forward"  # send the original instances on to the destinations


class SelectorMode(str, Enum):
    """How a route's conditions combine with its pipeline's default selector."""

    NARROW = "narrow"  # default selector AND conditions
    WIDEN = "widen"  # default selector OR conditions
    REPLACE = "replace"  # conditions only


class Condition(_Strict):
    """One test on a series. Exactly one operator is given.

    ``keyword`` names a DICOM keyword (``Modality``), a private tag as eight hex
    digits (``0019100C``) or the pseudo-keyword ``CallingAETitle``.
    ``aggregate`` turns the test into one on a series-level number:
    ``distinct`` (number of distinct values of the keyword over the series) or
    ``instances`` (number of instances; no keyword needed).
    """

    keyword: str | None = None
    aggregate: Literal["distinct", "instances"] | None = None
    equals: str | float | int | bool | None = None
    one_of: list[str | float | int] | None = None
    regex: str | None = None
    range: tuple[float | None, float | None] | None = Field(
        default=None, description="inclusive [min, max]; null for an open end"
    )
    exists: bool | None = None

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        ops = [n for n in ("equals", "one_of", "regex", "range", "exists") if getattr(self, n) is not None]
        if len(ops) != 1:
            raise ValueError(
                "a condition needs exactly one of equals, one_of, regex, range, exists"
                f" (found {', '.join(ops) or 'none'})"
            )
        if self.aggregate != "instances" and not self.keyword:
            raise ValueError("a condition needs a keyword (unless aggregate = 'instances')")
        if self.aggregate and ops[0] not in ("equals", "range"):
            raise ValueError("an aggregate condition takes equals or range")
        return self

    def describe(self) -> str:
        """Human readable form, used by ``aigw route explain``."""
        subject = self.keyword or ""
        if self.aggregate == "distinct":
            subject = f"distinct({self.keyword})"
        elif self.aggregate == "instances":
            subject = "instances"
        if self.equals is not None:
            return f"{subject} == {self.equals!r}"
        if self.one_of is not None:
            return f"{subject} in {self.one_of!r}"
        if self.regex is not None:
            return f"{subject} ~ /{self.regex}/"
        if self.range is not None:
            lo, hi = self.range
            return f"{'-inf' if lo is None else lo} <= {subject} <= {'inf' if hi is None else hi}"
        return f"{subject} {'exists' if self.exists else 'is absent'}"


class Route(_Strict):
    """A routing rule: which series go to which pipeline."""

    name: str = Field(min_length=1, max_length=64)
    pipeline: str
    selector: SelectorMode = SelectorMode.NARROW
    conditions: list[Condition] = Field(default_factory=list)
    calling_ae: list[str] = Field(default_factory=list, description="only from these senders")
    quiet_period_seconds: float | None = Field(default=None, gt=0, le=86400)

    _ae = field_validator("calling_ae")(lambda cls, v: [_check_ae(x) for x in v])


class DestinationType(str, Enum):
    """How results reach a destination."""

    DIMSE = "dimse"  # C-STORE SCU (PS3.4 B, PS3.7 9.1.1)
    DICOMWEB = "dicomweb"  # STOW-RS (PS3.18 10.5)


_DIMSE_KEYS = ("ae_title", "host", "port")
#: Optional keys of a dimse destination: DICOM TLS (PS3.15 B.9); ca_file is shared with dicomweb.
_DIMSE_TLS_KEYS = ("tls", "cert_file", "key_file", "server_name")
_DICOMWEB_KEYS = (
    "url", "token_env", "username", "password_env", "batch_size", "timeout_seconds", "verify",
)  # fmt: skip


class Destination(_Strict):
    """A node that receives results: a C-STORE SCP (``type = "dimse"``) or a STOW-RS service (``"dicomweb"``)."""

    name: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")
    type: DestinationType = Field(default=DestinationType.DIMSE, description="dimse (C-STORE) or dicomweb (STOW-RS)")
    ae_title: str | None = Field(default=None, description="dimse: the called AE title")
    host: str | None = Field(default=None, description="dimse: host name or address")
    port: int | None = Field(default=None, ge=1, le=65535, description="dimse: TCP port")
    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#\s]+[^?#\s]*$",
        description="dicomweb: base URL of the service; instances are POSTed to <url>/studies",
    )
    token_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="dicomweb: env variable holding a bearer token"
    )
    username: str | None = Field(default=None, min_length=1, description="dicomweb: user name for basic auth")
    password_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="dicomweb: env variable holding the password"
    )
    batch_size: int = Field(default=16, ge=1, le=1000, description="dicomweb: instances per STOW-RS request")
    timeout_seconds: float | None = Field(
        default=None, gt=0, description="dicomweb: connect and read timeout; default send.timeout_seconds"
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) to verify the server: an https url, or a dimse peer with tls"
    )
    verify: bool = Field(default=True, description="dicomweb: verify the https server's certificate and host name")
    tls: bool = Field(default=False, description="dimse: DICOM TLS (PS3.15 B.9), TLS 1.2 or later, BCP 195 ciphers")
    cert_file: Path | None = Field(default=None, description="dimse tls: our client certificate (PEM), if asked for")
    key_file: Path | None = Field(default=None, description="dimse tls: the private key (PEM) of cert_file")
    server_name: str | None = Field(
        default=None, min_length=1, description="dimse tls: name the server's certificate must carry; default host"
    )

    _ae = field_validator("ae_title")(lambda cls, v: v if v is None else _check_ae(v))

    @model_validator(mode="after")
    def _fields_of_type(self) -> Destination:
        # Refuse keys of the other type rather than ignore them: a dicomweb
        # destination with a port, or a dimse one with a url, is a typo.
        own, other = (
            ((*_DIMSE_KEYS, *_DIMSE_TLS_KEYS), _DICOMWEB_KEYS)
            if self.type == DestinationType.DIMSE
            else (_DICOMWEB_KEYS, (*_DIMSE_KEYS, *_DIMSE_TLS_KEYS))
        )
        wrong = [k for k in other if getattr(self, k) != type(self).model_fields[k].default]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: not a key of a {self.type.value} destination (its keys: {', '.join(own)})"
            )
        if self.type == DestinationType.DIMSE:
            missing = [k for k in _DIMSE_KEYS if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a dimse destination needs {', '.join(missing)} (or type = 'dicomweb' and url)")
            tls_only = [k for k in ("ca_file", "cert_file", "key_file", "server_name") if getattr(self, k) is not None]
            if tls_only and not self.tls:
                raise ValueError(f"{', '.join(tls_only)}: apply with tls = true only")
            if (self.cert_file is None) != (self.key_file is None):
                raise ValueError("cert_file and key_file go together (a client certificate and its key)")
            return self
        if self.url is None:
            raise ValueError("a dicomweb destination needs url, e.g. 'http://pacs:8042/dicom-web'")
        if "@" in self.url.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("url: no credentials in the url; use token_env or username + password_env")
        if self.token_env and (self.username or self.password_env):
            raise ValueError("token_env (bearer) and username/password_env (basic) exclude each other")
        if bool(self.username) != bool(self.password_env):
            raise ValueError("basic auth needs both username and password_env (the password never goes in the file)")
        if not self.url.startswith("https://") and (self.ca_file is not None or not self.verify):
            raise ValueError("ca_file and verify apply to an https:// url only")
        if self.ca_file is not None and not self.verify:
            raise ValueError("ca_file with verify = false: the CA file would not be used")
        return self


class ListenerTLS(_Strict):
    """The DICOM TLS listener (PS3.15 B.9): its own port beside the plain one, TLS 1.2 or later, BCP 195 ciphers."""

    port: int = Field(default=2762, ge=0, le=65535, description="TLS listen port (2762: dicom-tls); 0 picks one")
    cert_file: Path = Field(description="our server certificate chain (PEM)")
    key_file: Path = Field(description="the private key (PEM) of cert_file")
    ca_file: Path | None = Field(default=None, description="CA bundle (PEM) that client certificates must chain to")
    require_client_cert: bool = Field(
        default=False, description="refuse a handshake without a client certificate from ca_file (mutual TLS)"
    )

    @model_validator(mode="after")
    def _client_auth(self) -> ListenerTLS:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file, the CA that client certificates chain to")
        return self


class GatewaySettings(_Strict):
    ae_title: str = "AIGW"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    data_dir: Path = Path("aigw-data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/index.sqlite (WAL)"
    )
    allow_ae: list[str] = Field(default_factory=list, description="empty: accept any caller")
    allow_hosts: list[str] = Field(default_factory=list, description="IP addresses or CIDR blocks")
    require_called_ae: bool = Field(default=False, description="reject if called AE != ae_title")
    max_associations: int = Field(default=16, ge=1, le=1000)
    max_pdu_bytes: int = Field(default=262_144, ge=4096, le=16_777_216)
    max_instance_bytes: int = Field(default=4 * 1024**3, ge=1024)
    min_free_bytes: int = Field(
        default=2 * 1024**3, ge=0, description="refuse new instances (0xA700) under this free space"
    )
    network_timeout_seconds: float = Field(default=60, gt=0)
    artim_timeout_seconds: float = Field(
        default=30,
        gt=0,
        le=600,
        description="ARTIM (PS3.8 9.1.5): a connection must send a whole A-ASSOCIATE-RQ this soon after it is "
        "accepted, and a rejected or released peer must close this soon",
    )
    idle_timeout_seconds: float = Field(
        default=60,
        gt=0,
        description="an established association that sends nothing this long, or takes longer to send one PDU, "
        "is aborted",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="TCP connections at once, negotiating or associated; more are closed at once (counted)",
    )
    max_connections_per_address: int = Field(
        default=32, ge=1, le=10_000, description="TCP connections at once from one source address"
    )
    tls: ListenerTLS | None = Field(
        default=None, description="[gateway.tls]: a DICOM TLS listener beside the plain one; unset: none"
    )
    listener_processes: int | Literal["auto"] = Field(
        default=1,
        description="processes that accept DICOM on the port (and the TLS port), sharing them with SO_REUSEPORT, "
        "the data dir and the index; 'auto': one per core. max_associations, max_connections and "
        "max_connections_per_address hold for all of them together. 1: all in the gateway process",
    )

    @field_validator("listener_processes")
    @classmethod
    def _processes(cls, v: int | str) -> int | str:
        if v != "auto" and not (isinstance(v, int) and 1 <= v <= 64):
            raise ValueError("listener_processes is 'auto' or 1 to 64")
        return v

    def listener_count(self) -> int:
        """How many listener processes ``listener_processes`` asks for on this machine."""
        if self.listener_processes == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        return int(self.listener_processes)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae(v))
    _allow = field_validator("allow_ae")(lambda cls, v: [_check_ae(x) for x in v])

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        import ipaddress

        for h in v:
            ipaddress.ip_network(h, strict=False)  # raises ValueError with a clear message
        return v


class CompletionSettings(_Strict):
    series_timeout_seconds: float = Field(default=10.0, gt=0, le=86400)
    release_hint: bool = Field(default=True, description="treat an association release as a completion hint")
    release_quiet_seconds: float = Field(
        default=2.0, ge=0, description="after an association release, complete this soon"
    )
    hint_quiet_seconds: float = Field(
        default=1.0, ge=0, description="when a count hint says the series is whole, complete this soon"
    )
    abort_grace_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="after an aborted or cut association, and for every open series after a restart, complete"
        " no sooner than this: a sender that resumes keeps the series open, so one series gives one result",
    )
    late_instances: LatePolicy = LatePolicy.REPROCESS
    unrouted: UnroutedPolicy = UnroutedPolicy.KEEP
    poll_seconds: float = Field(default=0.25, gt=0, le=60)


class JobSettings(_Strict):
    workers: int = Field(default=1, ge=1, le=64)
    iocm_rejection_notes: bool = Field(
        default=False,
        description="when a rerun supersedes a result, also send an IHE IOCM rejection note (Key Object Selection, "
        "'Rejected for Quality Reasons') for the superseded instances; only for a PACS that acts on IOCM",
    )
    max_attempts: int = Field(default=3, ge=1, le=100)
    max_starts: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="a job found running when its process died (a crash, kill -9, out of memory) is started again "
        "(at once the first two times, then after backoff_seconds doubling) until it has been started this many "
        "times; then it fails for good, so that a job that kills its process cannot keep the service in a crash loop",
    )
    timeout_seconds: float = Field(
        default=3600,
        gt=0,
        description="a job running longer fails for good and its worker slot goes to the next job (embedded "
        "executor); its thread cannot be stopped and runs on, and once [jobs] workers such threads hold every "
        "worker, /healthz answers 503 (stuck) so that a supervisor restarts the service",
    )
    backoff_seconds: float = Field(default=5.0, ge=0)
    backoff_max_seconds: float = Field(default=600.0, ge=0)
    lease_seconds: float = Field(default=120.0, ge=5)
    executor: Literal["local", "celery"] = Field(
        default="local",
        description="local: jobs run in the gateway process; celery: on `aigw worker` nodes woken over a broker",
    )
    broker_url: str | None = Field(
        default=None, description="broker of executor 'celery', e.g. amqp://aigw:secret@rabbit:5672/aigw"
    )
    queue_prefix: str = Field(
        default="aigw", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="broker queues are <prefix>.cpu, <prefix>.gpu"
    )
    default_device: DeviceClass = Field(default=DeviceClass.CPU, description="device class of pipelines not in devices")
    devices: dict[str, DeviceClass] = Field(
        default_factory=dict, description="pipeline name -> device class of the workers that run its jobs"
    )
    max_concurrent_per_device: dict[DeviceClass, int] = Field(
        default_factory=lambda: {DeviceClass.GPU: 1},
        description="jobs running at once per device class in one process (a job is 'gpu' when one of its models "
        "runs on CUDA or TensorRT); a class not listed is limited by workers only",
    )

    @field_validator("max_concurrent_per_device")
    @classmethod
    def _per_device(cls, v: dict[DeviceClass, int]) -> dict[DeviceClass, int]:
        for device, n in v.items():
            if n < 1:
                raise ValueError(f"{device.value} = {n}: at least 1 (leave the class out for no limit)")
        return v


class SendSettings(_Strict):
    max_attempts: int = Field(default=10, ge=1, le=1000)
    backoff_seconds: float = Field(default=2.0, ge=0)
    backoff_max_seconds: float = Field(default=900.0, ge=0)
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_pdu_bytes: int = Field(default=262_144, ge=4096)


class MetricsAuth(str, Enum):
    """How ``/metrics`` checks its scraper (``/healthz`` and ``/readyz`` stay open for probes)."""

    NONE = "none"
    BASIC = "basic"  # RFC 7617: Authorization: Basic base64(username:secret)
    BEARER = "bearer"  # RFC 6750: Authorization: Bearer secret


class MetricsSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=9110, ge=0, le=65535, description="0: pick a free port")
    enabled: bool = True
    auth: MetricsAuth = Field(
        default=MetricsAuth.NONE,
        description="'none', 'basic' or 'bearer': what /metrics asks of its scraper; turn it on when host is not "
        "loopback (/healthz and /readyz stay open for probes)",
    )
    username: str = Field(default="prometheus", description="the user name of basic auth")
    credential_sha256: str | None = Field(
        default=None,
        description="hex SHA-256 of the bearer token or basic password (printf %s TOKEN | sha256sum); the "
        "secret itself never goes in this file",
    )
    credential_file: Path | None = Field(
        default=None,
        description="a file holding the token or password itself (a Docker or Kubernetes secret), read at each "
        "authenticated request, so a rotated secret applies at once; missing: every scrape gets 401",
    )
    cache_seconds: float = Field(
        default=5,
        ge=0,
        description="index-derived gauges (queue depth, backlog, dead letters, free space) are refreshed at most "
        "this often, however often /metrics is scraped",
    )
    max_connections: int = Field(
        default=32, ge=1, le=1024, description="open HTTP connections at most; the oldest unfinished one makes room"
    )
    read_timeout_seconds: float = Field(
        default=10, gt=0, le=300, description="time a client has to send its request, and to read the answer"
    )
    max_silence_seconds: float = Field(
        default=0,
        ge=0,
        description="alert when no instance is stored for this long (aigw_expected_max_silence_seconds); 0: off",
    )
    expect_gpu: bool | None = Field(
        default=None,
        description="alert when no GPU answers (aigw_gpu_expected); unset: expected if models.providers names "
        "CUDA or TensorRT",
    )

    @field_validator("credential_sha256")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v.strip()):
            raise ValueError("64 hexadecimal digits (printf %s TOKEN | sha256sum), not the secret itself")
        return v.strip().lower() if v is not None else None

    @model_validator(mode="after")
    def _credential(self) -> MetricsSettings:
        given = (self.credential_sha256 is not None) + (self.credential_file is not None)
        if self.auth != MetricsAuth.NONE and given != 1:
            raise ValueError(f"auth = '{self.auth.value}' needs exactly one of credential_sha256 and credential_file")
        return self


class DicomWebToken(_Strict):
    """One bearer token of the DICOMweb endpoint, stored only as its SHA-256 (``aigw dicomweb hash-token``)."""

    source: str = Field(
        description="the sender's name for this token: stored as the instance's calling AE, matched by routes' "
        "calling_ae and [gateway] allow_ae"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token (lower case)")

    _ae = field_validator("source")(lambda cls, v: _check_ae(v))


class DicomWebCertificate(_Strict):
    """A client certificate (mutual TLS) that authenticates as a source, like a token."""

    common_name: str = Field(min_length=1, description="the subject CN of the client's certificate")
    source: str = Field(
        description="source name recorded as the instances' calling AE title: routes' calling_ae and [gateway] allow_ae"
    )

    _ae = field_validator("source")(lambda cls, v: _check_ae(v))


class DicomWebSettings(_Strict):
    """The DICOMweb STOW-RS receiver (PS3.18 10.5): ``POST /studies``, in the service's process."""

    enabled: bool = False
    host: str = Field(default="127.0.0.1", description="listen address; loopback unless exposed on purpose")
    port: int = Field(default=8043, ge=0, le=65535, description="0: pick a free port")
    tokens: list[DicomWebToken] = Field(default_factory=list, description="accepted bearer tokens, hashed")
    allow_anonymous: bool = Field(default=False, description="accept requests without Authorization")
    anonymous_source: str = Field(default="ANONYMOUS", description="source name of anonymous requests")
    tls_cert: Path | None = Field(default=None, description="PEM certificate: serve HTTPS (with tls_key)")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM): a client certificate must chain to it (mutual TLS)"
    )
    require_client_cert: bool = Field(
        default=False, description="refuse a TLS handshake without a client certificate from tls_ca_file"
    )
    certificates: list[DicomWebCertificate] = Field(
        default_factory=list, description="client certificates (by subject CN) accepted instead of a token"
    )
    max_request_bytes: int = Field(
        default=8 * 1024**3, ge=1024, description="a larger request body is refused with 413, nothing stored"
    )
    request_timeout_seconds: float = Field(
        default=60, gt=0, description="longest wait for the next piece of a request body; then 408 and close"
    )
    header_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description="longest time for a request line and headers, from the connection or the previous answer; "
        "then 408 and close (slow clients cannot hold connections)",
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="HTTP connections open at once; another is answered 503 and closed, so that no number of "
        "clients can use up the file descriptors the DICOM listener needs too",
    )

    _anon = field_validator("anonymous_source")(lambda cls, v: _check_ae(v))

    @model_validator(mode="after")
    def _usable(self) -> DicomWebSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca_file is not None and self.tls_cert is None:
            raise ValueError("tls_ca_file needs tls_cert and tls_key: client certificates need HTTPS")
        if (self.require_client_cert or self.certificates) and self.tls_ca_file is None:
            raise ValueError("require_client_cert and certificates need tls_ca_file, the CA clients chain to")
        if self.enabled and not self.tokens and not self.certificates and not self.allow_anonymous:
            raise ValueError(
                "enabled without tokens or certificates would refuse every request: "
                "add tokens, certificates or allow_anonymous"
            )
        hashes = [t.sha256 for t in self.tokens]
        if len(set(hashes)) != len(hashes):
            raise ValueError("tokens: the same sha256 twice")
        names = [c.common_name for c in self.certificates]
        if len(set(names)) != len(names):
            raise ValueError("certificates: the same common_name twice")
        return self


class IdentitySettings(_Strict):
    manufacturer: str = "aigw open-source DICOM AI gateway"
    model_name: str = "aigw"
    device_serial_number: str = Field(
        default_factory=lambda: f"aigw-{socket.gethostname()}"[:64],
        description="DeviceSerialNumber written to derived objects; set it per node",
    )
    institution_name: str | None = None


class ModelSettings(_Strict):
    dir: Path | None = Field(default=None, description="default: the installed exported_models/")
    providers: list[str] | Literal["auto"] = "auto"
    warmup: bool = Field(
        default=True,
        description="at start, load and run each model of every available pipeline once on inputs built from its "
        "manifest, so the first job does not pay for session creation and CUDA/TensorRT kernel selection",
    )
    io_binding: bool = Field(
        default=True, description="run sessions on CUDA or TensorRT through ONNX Runtime IO binding; CPU: plain run"
    )
    batch_sizes: dict[str, int] = Field(
        default_factory=dict,
        description="model name -> items per session.run, overriding the pipeline's ModelSpec.batch_size",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: dict[str, int]) -> dict[str, int]:
        for name, n in v.items():
            if not re.match(r"^[a-z0-9][a-z0-9._-]*$", name):
                raise ValueError(f"{name!r} is not a model name (lower case letters, digits, '.', '_', '-')")
            if not 1 <= n <= 1_048_576:
                raise ValueError(f"{name} = {n}: a batch size is between 1 and 1048576")
        return v


class PipelineSettings(BaseModel):
    """Per-pipeline table: ``enabled`` plus the pipeline's own options.

    The options are kept as given here and validated against the pipeline's
    options model when the plugins are loaded (:func:`gateway.plugins.discover`),
    because only the plugin knows which keys it takes.
    """

    model_config = ConfigDict(extra="allow")
    enabled: bool = True


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    third_party_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING",
        description="level of highdicom, pydicom and pynetdicom: below WARNING they log source UIDs and "
        "association details (for debugging on test data only)",
    )


class Config(_Strict):
    """The whole effective configuration."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    pipelines: dict[str, PipelineSettings] = Field(default_factory=dict)
    plugins: list[str] = Field(
        default_factory=list,
        description="extra plugins as 'module:factory', besides installed entry points",
    )
    # Where the configuration came from, for messages about keys that only the
    # plugins can check ("aigw.toml: pipelines.ivim.min_bvalues: ...").
    _source: str = PrivateAttr(default="<defaults>")

    @property
    def source(self) -> str:
        """The file the configuration was read from, or ``<defaults>``."""
        return self._source

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for kind, names in (
            ("routes", [r.name for r in self.routes]),
            ("destinations", [d.name for d in self.destinations]),
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{kind}: duplicate name(s) {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _distributed_state_is_shared(self) -> Config:
        # Workers on other nodes read the index and the stored instances and
        # write outputs whose absolute paths the gateway's sender opens later.
        if self.jobs.executor != "celery":
            return self
        url = self.gateway.database_url or ""
        if not self.jobs.broker_url:
            raise ValueError("jobs.broker_url is required with jobs.executor = 'celery' (e.g. amqp://host:5672//)")
        if not url.startswith("postgresql"):
            raise ValueError(
                "gateway.database_url must be a PostgreSQL URL (postgresql+psycopg://...) with"
                " jobs.executor = 'celery': the gateway and every worker share the index"
                f" (got {url.split('://')[0] + '://...' if url else 'the default SQLite file'})"
            )
        if not self.gateway.data_dir.is_absolute():
            raise ValueError(
                "gateway.data_dir must be an absolute path with jobs.executor = 'celery': storage shared by"
                f" the gateway and every worker, mounted at the same path on each node (got '{self.gateway.data_dir}')"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.gateway.database_url or f"sqlite:///{self.gateway.data_dir / 'index.sqlite'}"

    def pipeline_options(self, name: str) -> dict[str, Any]:
        """The ``[pipelines.<name>]`` table without ``enabled``: the raw options the plugin validates."""
        s = self.pipelines.get(name)
        return dict(s.model_extra or {}) if s is not None else {}

    def pipeline_enabled(self, name: str) -> bool:
        s = self.pipelines.get(name)
        return s.enabled if s is not None else True


def parse_destination(spec: str, name: str | None = None) -> Destination:
    """Parse ``AE@HOST:PORT`` (the ``--destination`` flag form)."""
    m = re.match(r"^([^@]+)@(.+):(\d+)$", spec.strip())
    if not m:
        raise ConfigError(f"--destination {spec!r}: expected AE@HOST:PORT")
    ae, host, port = m.groups()
    try:
        return Destination(name=name or ae.strip().replace(" ", "_"), ae_title=ae, host=host, port=int(port))
    except ValidationError as exc:
        raise ConfigError(f"--destination {spec!r}: {_first_error(exc)}") from None


#: Environment variables and the setting each one overrides.
ENV_VARS: Mapping[str, str] = {
    "AIGW_AE_TITLE": "gateway.ae_title",
    "AIGW_HOST": "gateway.host",
    "AIGW_PORT": "gateway.port",
    "AIGW_DATA_DIR": "gateway.data_dir",
    "AIGW_DATABASE_URL": "gateway.database_url",
    "AIGW_ALLOW_AE": "gateway.allow_ae",  # comma separated
    "AIGW_ALLOW_HOSTS": "gateway.allow_hosts",  # comma separated addresses or CIDR blocks
    "AIGW_MIN_FREE_BYTES": "gateway.min_free_bytes",
    "AIGW_SERIES_TIMEOUT": "completion.series_timeout_seconds",
    "AIGW_METRICS_HOST": "metrics.host",
    "AIGW_METRICS_PORT": "metrics.port",
    "AIGW_METRICS_AUTH": "metrics.auth",
    "AIGW_METRICS_CREDENTIAL_SHA256": "metrics.credential_sha256",
    "AIGW_METRICS_CREDENTIAL_FILE": "metrics.credential_file",
    "AIGW_WORKERS": "jobs.workers",
    "AIGW_EXECUTOR": "jobs.executor",
    "AIGW_BROKER_URL": "jobs.broker_url",
    "AIGW_DESTINATIONS": "destinations",  # comma separated AE@HOST:PORT
    "AIGW_LOG_LEVEL": "logging.level",
    "AIGW_LOG_FORMAT": "logging.format",
    "AIGW_MODELS_DIR": "models.dir",
    "AIGW_DEVICE_SERIAL_NUMBER": "identity.device_serial_number",
}

_LIST_KEYS = {"gateway.allow_ae", "gateway.allow_hosts"}


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{_loc(e['loc'])}: {e['msg']}"


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration from file, environment and flags.

    Parameters
    ----------
    path : path, optional
        TOML file. Without one the embedded defaults apply.
    overrides : mapping, optional
        Dotted keys (``gateway.port``) from command-line flags; highest precedence.
    environ : mapping, optional
        Environment to read ``AIGW_*`` from (default ``os.environ``).

    Raises
    ------
    ConfigError
        With a message naming the source, the key path and the reason.
    """
    source = str(path) if path else "<defaults>"
    tree: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None

    env = os.environ if environ is None else environ
    env_used: list[str] = []
    for var, key in ENV_VARS.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        env_used.append(var)
        value: Any = raw
        if key == "destinations":
            try:
                value = [parse_destination(s).model_dump() for s in raw.split(",") if s.strip()]
            except ConfigError as exc:
                raise ConfigError(f"environment {var}: {exc}") from None
        elif key in _LIST_KEYS:
            value = [s for s in raw.split(",") if s.strip()]
        _set(tree, key, value)

    for key, value in (overrides or {}).items():
        if value is None or value == []:
            continue
        if key == "destinations":
            value = [d.model_dump() if isinstance(d, Destination) else d for d in value]
        _set(tree, key, value)

    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = _loc(e["loc"])
            origin = source
            for var, key in ENV_VARS.items():
                if var in env_used and loc.startswith(key):
                    origin = f"environment {var}"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{origin}: {loc or '(top level)'}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    cfg._source = source
    return cfg
