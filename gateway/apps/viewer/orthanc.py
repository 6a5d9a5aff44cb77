"""A real Orthanc as the PACS: started on free loopback ports, with its DICOMweb plugin and a few REST helpers."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.apps.viewer._tools import find_tool, free_port, setup_hint, wait_until
from gateway.apps.viewer._tools import http_request as _http_request

__all__ = ["DICOMWEB_PLUGIN", "Orthanc"]


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """A real Orthanc server as the PACS, with a few REST helpers.

    Parameters
    ----------
    root : pathlib.Path
        Folder for its configuration, database and log.
    ae_title : str
        Orthanc's own AE title.
    always_allow_store : bool
        Accept C-STORE from any calling AE (``DicomAlwaysAllowStore``).
    check_called_aet : bool
        Reject associations whose called AE title is not ``ae_title``.
    dicomweb : bool or None
        Load the DICOMweb plugin (``/dicom-web/``, ``/wado``). ``None`` loads it
        when it is installed; ``True`` requires it.
    dicomweb_config : dict, optional
        More keys of the ``DicomWeb`` section, for example ``Servers``: the
        peers of Orthanc's own STOW-RS client (``/dicom-web/servers/{name}/stow``).
    users : dict of str to str, optional
        Require HTTP basic auth (REST and DICOMweb) with these user names and
        passwords (``AuthenticationEnabled``, ``RegisteredUsers``); the REST
        helpers log in as the first one.
    extra_config : dict, optional
        More top-level configuration keys (DICOM TLS, modalities), applied last.
    """

    def __init__(
        self,
        root: Path,
        ae_title: str = "ORTHANC",
        always_allow_store: bool = True,
        check_called_aet: bool = False,
        dicomweb: bool | None = None,
        dicomweb_config: dict[str, Any] | None = None,
        users: dict[str, str] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self._auth: dict[str, str] = {}
        if users:
            user, password = next(iter(users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._auth = {"Authorization": f"Basic {token}"}
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if dicomweb is None:
            dicomweb = DICOMWEB_PLUGIN.is_file()
        elif dicomweb and not DICOMWEB_PLUGIN.is_file():
            raise RuntimeError(setup_hint(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is missing"))
        self.dicomweb = dicomweb
        root.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": "aigw-test-pacs",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": dict(users or {}),
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowStore": always_allow_store,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {},
            "HttpServerEnabled": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "StorageCompression": False,
            "OverwriteInstances": False,
        }
        if dicomweb:
            # Keys of DICOMweb plugin 1.7 (Debian 12). "Full" metadata reads every
            # instance from storage, so the JSON that OHIF gets holds the
            # sequences (functional groups, segment and SR content) that the
            # main-tags shortcut would drop.
            cfg["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
                **(dicomweb_config or {}),
            }
        cfg.update(extra_config or {})
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=1))

    def start(self, timeout: float = 30) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        with open(self.root / "orthanc.log", "ab") as logfile:
            self.proc = subprocess.Popen([find_tool("Orthanc"), str(self.config)], stdout=logfile, stderr=logfile)
        wait_until(self._ready, timeout, "Orthanc to start")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log_text = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{log_text}")
        return self._http("GET", f"{self.url}/system", timeout=5)[0] == 200

    def stop(self, graceful: bool = True) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 10 s; at once when not ``graceful``).

        Orthanc takes about 3.5 s to shut down; a throw-away test instance need not wait.
        """
        if self.proc is not None:
            if graceful:
                self.proc.terminate()
            else:
                self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _http(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        """An HTTP request to this Orthanc, logged in when it has users."""
        return _http_request(method, url, body, {**self._auth, **(headers or {})}, timeout)

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        """GET a REST path and decode its JSON.

        Raises
        ------
        RuntimeError
            On any status but 200.
        """
        code, body = self._http("GET", self.url + path)
        if code != 200:
            raise RuntimeError(f"Orthanc GET {path}: HTTP {code}")
        return json.loads(body)

    def instance_uids(self) -> list[str]:
        """SOPInstanceUID of every instance Orthanc holds (duplicates would show twice)."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            out.append(tags["SOPInstanceUID"])
        return out

    def statistics(self) -> dict[str, Any]:
        """Orthanc's ``/statistics`` (counts and disk size)."""
        return dict(self.get("/statistics"))

    def upload(self, files: Path | Iterable[Path]) -> list[dict[str, Any]]:
        """Store DICOM files over REST (``POST /instances``), one request per file.

        Returns
        -------
        list of dict
            Orthanc's answer per file (``ID``, ``ParentSeries``, ``Status`` ...).

        Raises
        ------
        RuntimeError
            When Orthanc refuses a file.
        """
        out = []
        for path in [files] if isinstance(files, Path) else files:
            code, body = self._http(
                "POST", f"{self.url}/instances", path.read_bytes(), {"Content-Type": "application/dicom"}, timeout=120
            )
            if code != 200:
                raise RuntimeError(f"Orthanc refused {path.name}: HTTP {code} {body[:200]!r}")
            out.append(json.loads(body))
        return out

    def lookup(self, uid: str, level: str = "Series") -> str:
        """Orthanc's identifier of the study, series or instance with this DICOM UID.

        Raises
        ------
        KeyError
            When Orthanc holds nothing at ``level`` with that UID.
        """
        code, body = self._http("POST", f"{self.url}/tools/lookup", uid.encode(), timeout=10)
        for hit in json.loads(body) if code == 200 else []:
            if hit.get("Type") == level:
                return str(hit["ID"])
        raise KeyError(f"Orthanc holds no {level.lower()} {uid}")

    def series_id(self, series_uid: str) -> str:
        """Orthanc's identifier of the series with this SeriesInstanceUID."""
        return self.lookup(series_uid, "Series")

    def file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as Orthanc stores it."""
        code, body = self._http("GET", f"{self.url}/instances/{instance_id}/file", timeout=120)
        if code != 200:
            raise RuntimeError(f"Orthanc GET /instances/{instance_id}/file: HTTP {code}")
        return body

    def rendered(self, instance_id: str, frame: int = 0) -> bytes:
        """Orthanc's own PNG of one frame (``/instances/{id}/frames/{n}/preview``).

        Orthanc stretches the stored values over their full range; it applies
        no VOI LUT.

        Raises
        ------
        RuntimeError
            When Orthanc cannot render it (HTTP 415 for float pixel data or a
            data set without pixels).
        """
        code, body = self._http(
            "GET", f"{self.url}/instances/{instance_id}/frames/{frame}/preview", headers={"Accept": "image/png"}
        )
        if code != 200:
            raise RuntimeError(f"Orthanc could not render instance {instance_id} frame {frame}: HTTP {code}")
        return body
