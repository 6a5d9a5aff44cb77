"""A radiology viewer in the loop: Orthanc + OHIF + headless Chromium, all on loopback.

:class:`Viewer` starts, on free 127.0.0.1 ports, a real Orthanc with its
DICOMweb plugin (:class:`Orthanc`), OHIF's prebuilt viewer served with
Orthanc's DICOMweb behind the same origin (:class:`OhifServer`), and a
headless Chromium driven by Playwright. :meth:`Viewer.screenshot_series`
opens one series, waits until its viewport has drawn it, screenshots the page
and crops the viewport; :func:`image_stats` says whether the image area is
blank, saturated or flat. Nothing comes from the network and everything is
stopped on exit::

    with Viewer() as viewer:
        viewer.upload(paths)
        shot = viewer.screenshot_series(study_uid, series_uid, Path("out/mr.png"))
        assert not shot.stats.problems(), shot.stats

What is needed: Debian's ``orthanc`` and ``orthanc-dicomweb`` (1.10 / 1.7),
``chromium``, the Python package ``playwright`` (extra ``[viewer]``; it drives
the system browser, ``playwright install`` is never used) and OHIF 3.13.2's
``dist/`` in ``.viewer/ohif/dist`` (or ``$AIGW_OHIF_DIST``). ``ops/setup.sh``
installs all of them; a missing one raises :class:`RuntimeError` naming it.

How each kind of series is shown (OHIF 3.13.2, Chromium 156 headless with
SwiftShader WebGL2, 1280 x 800). Every page is
``/<route>?StudyInstanceUIDs=<study>&initialSeriesInstanceUID=<series>``;
the times run from opening the page to the screenshot (the first page of a
browser takes about 3 s more, loading and compiling OHIF's 17 MB bundle):

* MR, derived MR (lf2hf, IVIM maps as MR): ``/viewer``; waits for the
  series' display set in a viewport, cornerstone's IMAGE_RENDERED there and
  no loading bar. 6-11 s.
* SEG over an MR/CT source: ``/viewer`` with the SEG as the initial series;
  OHIF hangs the source and loads the SEG over it without asking
  (``disableConfirmationPrompts``); waits for the segmentation
  representation in that viewport. 8-19 s.
* Parametric Map: ``/viewer`` with the map; a volume viewport of the source
  with the map in colour over it; waits for both volumes to load. 9-12 s.
* SR with SCOORD content: ``/viewer`` with the SR; OHIF's SR viewport, the
  referenced image with the measurements drawn (SVG). 10 s.
* VL Whole Slide Microscopy: ``/microscopy``; dicom-microscopy-viewer
  (OpenLayers); waits for its map and until no DICOMweb request is in
  flight. 9.5 s.
* the fallback (below): no page, 0.1-3 s.

In every mode the screenshot is taken when, in addition, two screenshots of
the viewport 250 ms apart are identical: tiles, overlays and annotations have
stopped changing. OHIF's notifications are hidden for it and returned in
:attr:`Screenshot.notes`. The viewport crop is the ``.viewport-wrapper``
around the cornerstone element (overlay text included); the image area in it
is the image's corners through the camera (``worldToCanvas``), and the
statistics are of that area; in the microscopy mode and for the fallback
they are of the whole picture (glass is near white: pass a higher
``max_white`` to :meth:`ImageStats.problems`; an SR's picture is a text page).
Each screenshot opens a fresh page, so nothing carries over from the last
one; moving the same page on by OHIF's client-side routing would save about
5 s a screenshot.

What OHIF 3.13 does not show, and so goes to the fallback when the mode is
chosen automatically (:meth:`Viewer.choose_mode`):

* a SEG over a slide: the microscopy mode has no SEG handler, and ``/viewer``
  crashes on it. The fallback draws the segments in red over the slide's
  pyramid level (placed by slide coordinates, pixel matrix as stored, not
  turned the way the microscopy viewer turns it);
* a slide whose THUMBNAIL is larger than its second level: the microscopy
  viewer rounds both to one zoom factor and throws "`resolutions` must be
  sorted in descending order" (the synthetic slides of the wsi-mil tests have
  a 1024 px thumbnail over an 800 px level); the fallback is Orthanc's
  rendering of the thumbnail;
* a Parametric Map whose source series has more images than the map has
  frames (IVIM maps over a multi-b-value DWI series): OHIF's loader sizes the
  map by its own frames and indexes it by the source image's place in its
  series, and fails with "RangeError: Invalid typed array length"; the
  fallback renders the middle frame through its own VOI window with pydicom
  (Orthanc answers 415 for float pixel data);
* an SR without SCOORD/SCOORD3D content (the wsi-mil report, whose region is
  a SEG reference): nothing to draw, ``/viewer`` even throws a TypeError; the
  fallback is the content tree as text.

``use_cpu_rendering=True`` (cornerstone's CPU path) draws plain images only:
labelmaps fail ("Something went wrong") and volume viewports are refused, so
SEG and PM go to the fallback then. WebGL through SwiftShader works headless
and is the default.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import mimetypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
    from playwright.sync_api import BrowserContext, FloatRect, Page, Playwright

__all__ = [
    "ImageStats",
    "OhifServer",
    "Orthanc",
    "Screenshot",
    "Viewer",
    "ViewerMode",
    "find_tool",
    "image_stats",
    "ohif_dist",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SETUP_COMMAND = "ops/setup.sh"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
OHIF_VERSION = "3.13.2"


def _setup_hint(what: str) -> str:
    return f"{what}; `{SETUP_COMMAND}` (README, Quick start) installs it"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tool(tool: str, *alternatives: str) -> str:
    """Path of a system binary, never a same-named script in the virtualenv.

    pynetdicom installs console scripts (``storescu`` ...) into the venv that
    shadow DCMTK's; the peers must be the real ones.

    Raises
    ------
    RuntimeError
        When none of the names is on ``PATH``; the message names the setup command.
    """
    search = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not Path(d).resolve().is_relative_to(Path(sys.prefix).resolve())
    )
    for name in (tool, *alternatives):
        path = shutil.which(name, path=search)
        if path is not None:
            return path
    raise RuntimeError(_setup_hint(f"{tool} is not installed"))


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except OSError:
        return 0, b""


# --------------------------------------------------------------------------- Orthanc


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
    """

    def __init__(
        self,
        root: Path,
        ae_title: str = "ORTHANC",
        always_allow_store: bool = True,
        check_called_aet: bool = False,
        dicomweb: bool | None = None,
    ) -> None:
        self.root = root
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if dicomweb is None:
            dicomweb = DICOMWEB_PLUGIN.is_file()
        elif dicomweb and not DICOMWEB_PLUGIN.is_file():
            raise RuntimeError(_setup_hint(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is missing"))
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
            "AuthenticationEnabled": False,
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
            }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=1))

    def start(self, timeout: float = 30) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        with open(self.root / "orthanc.log", "ab") as logfile:
            self.proc = subprocess.Popen([find_tool("Orthanc"), str(self.config)], stdout=logfile, stderr=logfile)
        _wait(self._ready, timeout, "Orthanc to start")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log_text = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{log_text}")
        return _http("GET", f"{self.url}/system", timeout=5)[0] == 200

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
        code, body = _http("GET", self.url + path)
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
            code, body = _http(
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
        code, body = _http("POST", f"{self.url}/tools/lookup", uid.encode(), timeout=10)
        for hit in json.loads(body) if code == 200 else []:
            if hit.get("Type") == level:
                return str(hit["ID"])
        raise KeyError(f"Orthanc holds no {level.lower()} {uid}")

    def series_id(self, series_uid: str) -> str:
        """Orthanc's identifier of the series with this SeriesInstanceUID."""
        return self.lookup(series_uid, "Series")

    def file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as Orthanc stores it."""
        code, body = _http("GET", f"{self.url}/instances/{instance_id}/file", timeout=120)
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
        code, body = _http(
            "GET", f"{self.url}/instances/{instance_id}/frames/{frame}/preview", headers={"Accept": "image/png"}
        )
        if code != 200:
            raise RuntimeError(f"Orthanc could not render instance {instance_id} frame {frame}: HTTP {code}")
        return body


# --------------------------------------------------------------------------- OHIF static server + proxy


def ohif_dist(dist: Path | None = None) -> Path:
    """Folder holding OHIF's prebuilt viewer (``index.html``, ``app.bundle.*.js`` ...).

    Taken from ``dist``, else ``$AIGW_OHIF_DIST``, else ``<repo>/.viewer/ohif/dist``
    (where the setup script unpacks ``@ohif/app``).

    Raises
    ------
    RuntimeError
        When the folder has no ``index.html``.
    """
    folder = dist or Path(os.environ.get("AIGW_OHIF_DIST") or REPO / ".viewer" / "ohif" / "dist")
    if not (folder / "index.html").is_file():
        raise RuntimeError(_setup_hint(f"the OHIF viewer {OHIF_VERSION} is not unpacked in {folder}"))
    return folder


def app_config(use_cpu_rendering: bool = False) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, same origin, nothing external."""
    # Same-origin URLs (built in the page from window.location) keep the
    # browser from preflighting every request and need no CORS in Orthanc.
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        # The onboarding tour dims the page under a popup on first visit.
        "customizationService": {"global": {"ohif.tours": {"$set": []}}},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "useCPURendering": use_cpu_rendering,
        # The dialog is a modal over the viewport; "never" keeps it away.
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        # SEG, RTSTRUCT and SR load into the viewport at once instead of
        # waiting behind a "Do you want to open ...?" prompt.
        "disableConfirmationPrompts": True,
        "measurementTrackingMode": "simplified",
        "defaultDataSourceName": "orthanc",
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
    }
    source = {
        "friendlyName": "aigw Orthanc",
        "name": "orthanc",
        "qidoSupportsIncludeField": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "supportsReject": False,
        "dicomUploadEnabled": False,
        "staticWado": False,
        "singlepart": "bulkdata,video,pdf",
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
    }
    return (
        "/* generated by gateway.viewer: OHIF against the Orthanc behind this origin */\n"
        "(function () {\n"
        "  const origin = window.location.origin;\n"
        f"  const config = {json.dumps(config, indent=2)};\n"
        f"  const source = {json.dumps(source, indent=2)};\n"
        "  source.qidoRoot = origin + '/dicom-web';\n"
        "  source.wadoRoot = origin + '/dicom-web';\n"
        "  source.wadoUriRoot = origin + '/wado';\n"
        "  config.dataSources = [{\n"
        "    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',\n"
        "    sourceName: 'orthanc',\n"
        "    configuration: source,\n"
        "  }];\n"
        "  config.httpErrorHandler = error => console.warn('aigw: HTTP error', error && error.status);\n"
        "  window.config = config;\n"
        "})();\n"
    )


_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}
_PROXIED_REQUEST_HEADERS = ("Accept", "Content-Type", "Content-Length", "Range")
_PROXIED_RESPONSE_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges")


class _Handler(BaseHTTPRequestHandler):
    server: _OhifHTTPServer

    # HTTP/1.0: one request per connection, so a proxied body of unknown length
    # simply ends with the connection and needs no chunked re-encoding.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        # Every bundle and frame would be a line on stderr; debug level only.
        log.debug("ohif %s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_POST(self) -> None:
        if self._proxied():
            self._proxy()
        else:
            self.send_error(405)

    def _proxied(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path
        return path.startswith("/dicom-web/") or path == "/dicom-web" or path == "/wado" or path.startswith("/wado/")

    def _dispatch(self, send_body: bool) -> None:
        if self._proxied():
            self._proxy()
            return
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path == "/app-config.js":
            self._send(200, self.server.app_config, "text/javascript", send_body, cache=False)
            return
        root = self.server.dist
        file = (root / path.lstrip("/")).resolve()
        if not file.is_relative_to(root):
            self.send_error(404)
            return
        if not file.is_file():
            # SPA fallback: /viewer, /microscopy ... are client-side routes.
            # Paths that look like files (an extension) stay 404, so a missing
            # bundle shows as an error instead of as HTML parsed as JS.
            if Path(path).suffix:
                self.send_error(404)
                return
            file = root / "index.html"
        self._send(200, file.read_bytes(), _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0], send_body)

    def _send(self, code: int, body: bytes | str, ctype: str | None, send_body: bool, cache: bool = True) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        # The bundles are content-hashed; caching them makes the second page
        # in the same browser profile load from memory.
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _proxy(self) -> None:
        headers = {k: v for k in _PROXIED_REQUEST_HEADERS if (v := self.headers.get(k)) is not None}
        # Orthanc builds the absolute URLs in its answers (RetrieveURL,
        # BulkDataURI) from the Host header; the browser's Host makes them
        # point back at this origin rather than at Orthanc's own port.
        headers["Host"] = self.headers.get("Host", f"127.0.0.1:{self.server.server_port}")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=300)
        try:
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
            except OSError as e:
                log.warning("ohif proxy: Orthanc on port %d: %s", self.server.orthanc_port, e)
                self.send_error(502, "Orthanc is not answering")
                return
            self.send_response(response.status, response.reason)
            for name in _PROXIED_RESPONSE_HEADERS:
                value = response.getheader(name)
                if value is not None:
                    self.send_header(name, value)
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                while chunk := response.read(1 << 16):
                    self.wfile.write(chunk)
        except OSError as e:
            # The browser closing a connection (a cancelled prefetch) ends up
            # here too; it is not an error of the proxy.
            log.debug("ohif proxy %s %s: %s", self.command, self.path, e)
        finally:
            upstream.close()


class _OhifHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    dist: Path
    app_config: str
    orthanc_port: int


class OhifServer:
    """OHIF's prebuilt viewer and Orthanc's DICOMweb behind one loopback origin.

    A stdlib ``ThreadingHTTPServer`` in a daemon thread. It serves the dist
    folder (unknown paths fall back to ``index.html``, as a single-page app
    needs), a generated ``app-config.js``, and proxies ``/dicom-web/...`` and
    ``/wado`` to Orthanc, so the browser sees a single origin.

    Parameters
    ----------
    orthanc_port : int
        HTTP port of the Orthanc to proxy to (on 127.0.0.1).
    dist : pathlib.Path or None
        OHIF's dist folder; see :func:`ohif_dist`.
    use_cpu_rendering : bool
        Ask cornerstone to render on the CPU instead of WebGL.
    """

    def __init__(self, orthanc_port: int, dist: Path | None = None, use_cpu_rendering: bool = False) -> None:
        self.dist = ohif_dist(dist).resolve()
        self.orthanc_port = orthanc_port
        self.use_cpu_rendering = use_cpu_rendering
        self._server: _OhifHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OhifServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        server = _OhifHTTPServer(("127.0.0.1", 0), _Handler)
        server.dist = self.dist
        server.app_config = app_config(self.use_cpu_rendering)
        server.orthanc_port = self.orthanc_port
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("OhifServer is not started")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """Base URL of the viewer."""
        return f"http://127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- pixel statistics


@dataclass(frozen=True)
class ImageStats:
    """Grey-level statistics of a picture region (luminance, 0-255).

    Attributes
    ----------
    width, height : int
        Size of the region in pixels.
    black_fraction : float
        Share of pixels at or below the dark threshold.
    white_fraction : float
        Share of pixels at or above the bright threshold.
    uniform_fraction : float
        Share of pixels at the most common grey level (``uniform_level``): an
        image of one value is blank whatever the value, and a viewer maps a
        constant image to whichever grey its window puts it at.
    uniform_level : int
        The most common grey level.
    grey_levels : int
        Number of distinct grey levels.
    mean, std : float
        Mean and standard deviation of the luminance.
    """

    width: int
    height: int
    black_fraction: float
    white_fraction: float
    uniform_fraction: float
    uniform_level: int
    grey_levels: int
    mean: float
    std: float

    def problems(
        self,
        max_black: float = 0.95,
        max_white: float = 0.5,
        max_uniform: float = 0.9,
        min_levels: int = 16,
        min_std: float = 4.0,
    ) -> list[str]:
        """Why the region does not look like a rendered image; empty when it does.

        Each entry starts with ``blank``, ``saturated`` or ``flat``. The
        defaults suit a radiology image area; a bright-field slide, mostly
        white glass, needs a higher ``max_white``.
        """
        out = []
        if self.black_fraction > max_black:
            out.append(f"blank: {self.black_fraction:.0%} near-black pixels (limit {max_black:.0%})")
        elif self.uniform_fraction > max_uniform:
            out.append(
                f"blank: {self.uniform_fraction:.0%} of the pixels at grey level {self.uniform_level} "
                f"(limit {max_uniform:.0%})"
            )
        if self.white_fraction > max_white:
            out.append(f"saturated: {self.white_fraction:.0%} near-white pixels (limit {max_white:.0%})")
        if self.grey_levels < min_levels:
            out.append(f"flat: {self.grey_levels} grey levels (need {min_levels})")
        if self.std < min_std:
            out.append(f"flat: grey-level standard deviation {self.std:.1f} (need {min_std})")
        return out


def image_stats(
    png: Path | bytes, box: tuple[int, int, int, int] | None = None, dark: int = 16, bright: int = 240
) -> ImageStats:
    """Grey-level statistics of a PNG, or of ``box`` (left, top, right, bottom) in it.

    Parameters
    ----------
    png : pathlib.Path or bytes
        The picture (colour is reduced to luminance, ITU-R 601).
    box : tuple of int or None
        Region in pixels, right and bottom exclusive; ``None`` for all of it.
    dark, bright : int
        Luminance at or below which a pixel counts as black, at or above which as white.

    Raises
    ------
    ValueError
        When the region is empty.
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        grey = im.convert("L")
        if box is not None:
            grey = grey.crop(box)
        a = np.asarray(grey, dtype=np.uint8)
    if a.size == 0:
        raise ValueError(f"empty region {box} in the picture")
    counts = np.bincount(a.ravel(), minlength=256)
    return ImageStats(
        width=int(a.shape[1]),
        height=int(a.shape[0]),
        black_fraction=float(np.mean(a <= dark)),
        white_fraction=float(np.mean(a >= bright)),
        uniform_fraction=float(counts.max() / a.size),
        uniform_level=int(counts.argmax()),
        grey_levels=int(np.count_nonzero(counts)),
        mean=float(a.mean()),
        std=float(a.std()),
    )


# --------------------------------------------------------------------------- the browser


class ViewerMode(str, Enum):
    """How a series is shown: an OHIF route, or a picture made without OHIF."""

    #: OHIF's basic viewer (``/viewer``): images, derived series, SEG over its
    #: source, Parametric Maps, SR with spatial coordinates.
    VIEWER = "viewer"
    #: OHIF's microscopy mode (``/microscopy``): VL Whole Slide Microscopy.
    MICROSCOPY = "microscopy"
    #: No OHIF: Orthanc's own rendering of one frame (``/preview``), or where
    #: Orthanc has none (float pixels, SR) the harness's rendering with pydicom.
    FALLBACK = "fallback"


@dataclass(frozen=True)
class Screenshot:
    """A screenshot of one series in the viewer.

    Attributes
    ----------
    page_png : pathlib.Path
        The whole browser page (for :attr:`ViewerMode.FALLBACK` the picture itself).
    viewport_png : pathlib.Path
        The viewport that shows the series, cropped from the page.
    stats : ImageStats
        Grey-level statistics of the image area inside the viewport
        (``image_box``), or of the whole viewport where the image area is unknown.
    image_box : tuple of int or None
        The image area in ``viewport_png`` (left, top, right, bottom).
    mode : ViewerMode
        How the series was shown.
    url : str
        The page that was opened ("" for the fallback).
    seconds : float
        From opening the page to the screenshot.
    notes : tuple of str
        Notifications OHIF showed (hidden for the screenshot; an error toast
        such as "Something went wrong" can come with a complete picture, so
        check the picture too), and why the fallback was used where it was.
    """

    page_png: Path
    viewport_png: Path
    stats: ImageStats
    image_box: tuple[int, int, int, int] | None
    mode: ViewerMode
    url: str
    seconds: float
    notes: tuple[str, ...] = ()


# Chromium without a display, a GPU or a network. SwiftShader is the software
# WebGL2 that cornerstone and OpenLayers render with, the same on every
# machine; --enable-unsafe-swiftshader keeps it allowed now that Chromium no
# longer falls back to it by itself. The resolver rule fails every name but
# loopback at once, so nothing waits on the closed network.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)

# Counts cornerstone's IMAGE_RENDERED per viewport: the event does not bubble,
# but a capturing listener on the document still sees it on its way down.
# OHIF drops some failed promises on the floor; logging them lets a timeout
# say why.
_INIT_SCRIPT = """
window.__aigw = { rendered: {} };
document.addEventListener('CORNERSTONE_IMAGE_RENDERED', e => {
  const id = (e.detail && e.detail.viewportId) || 'unknown';
  window.__aigw.rendered[id] = (window.__aigw.rendered[id] || 0) + 1;
}, true);
window.addEventListener('unhandledrejection', e => {
  const r = e.reason;
  console.error('unhandled rejection: ' + ((r && (r.stack || r.message)) || r));
});
"""

# One poll of a cornerstone viewport: which viewport shows the series, whether
# everything it needs has loaded and been drawn, and where the image lies.
_PROBE_CORNERSTONE = """
(seriesUid) => { try {
  const s = window.services, cs = window.cornerstone;
  if (!s || !cs || !s.viewportGridService || !s.displaySetService) return { ready: false, why: 'OHIF is booting' };
  const grid = s.viewportGridService.getState();
  if (!grid || !grid.viewports) return { ready: false, why: 'OHIF is booting' };
  const targets = s.displaySetService.getActiveDisplaySets().filter(d => d.SeriesInstanceUID === seriesUid);
  if (!targets.length) return { ready: false, why: 'the series has no display set yet' };
  const uids = targets.map(d => d.displaySetInstanceUID);
  // A SEG (or RTSTRUCT) is drawn once it is a segmentation representation in
  // the viewport of its source; before that (or when loading it failed) it
  // may sit in the viewport as a display set that draws nothing.
  const labels = targets.some(d => d.Modality === 'SEG' || d.Modality === 'RTSTRUCT');
  const segs = id => (s.segmentationService && s.segmentationService.getSegmentationRepresentations)
    ? s.segmentationService.getSegmentationRepresentations(id).map(r => r.segmentationId) : [];
  let vpId = null;
  for (const [id, vp] of grid.viewports) {
    const shown = labels ? segs(id) : (vp.displaySetInstanceUIDs || []);
    if (shown.some(u => uids.includes(u))) { vpId = id; break; }
  }
  if (!vpId) return { ready: false, why: labels ? 'the segmentation is not loaded into a viewport yet'
                                                : 'no viewport shows the series yet' };
  const el = document.querySelector(`[data-viewport-uid="${vpId}"]`);
  // The wrapper also holds the overlays (orientation markers, window/level).
  const pane = el && (el.closest('.viewport-wrapper') || el);
  const canvas = el && el.querySelector('canvas');
  if (!pane || !canvas) return { ready: false, why: `viewport ${vpId} has no canvas yet` };
  const r = pane.getBoundingClientRect();
  const out = { ready: false, viewportId: vpId, pane: [r.left, r.top, r.right, r.bottom] };
  if (pane.querySelector('.loading') || document.querySelector('.infinite-loading-bar'))
    return { ...out, why: 'loading indicator shown' };
  for (const d of targets) {
    if (d.isLoaded === false || d.isLoading) return { ...out, why: `${d.Modality} display set still loading` };
    if ((d.measurements || []).some(m => m.loaded === false)) return { ...out, why: 'SR measurements still loading' };
  }
  const enabled = cs.getEnabledElementByViewportId(vpId);
  const viewport = enabled && enabled.viewport;
  const imageId = viewport && viewport.getCurrentImageId && viewport.getCurrentImageId();
  if (!imageId) return { ...out, why: 'no image in the viewport yet' };
  const actors = viewport.getActors ? viewport.getActors() : [];
  for (const a of (Array.isArray(actors) ? actors : [])) {
    const volume = a.referencedId && cs.cache.getVolume(a.referencedId);
    if (volume && volume.loadStatus && volume.loadStatus.loading && !volume.loadStatus.loaded)
      return { ...out, why: `volume ${a.referencedId} still loading` };
  }
  if (!(window.__aigw && window.__aigw.rendered[vpId])) return { ...out, why: 'cornerstone has not rendered yet' };
  const plane = cs.metaData.get('imagePlaneModule', imageId);
  if (plane && plane.imagePositionPatient && plane.rowCosines && plane.columnCosines && plane.rows) {
    // The image's corners (pixel edges, PS3.3 C.7.6.2.1.1) through the camera.
    const p = plane.imagePositionPatient, rc = plane.rowCosines, cc = plane.columnCosines;
    const dx = plane.columnPixelSpacing || 1, dy = plane.rowPixelSpacing || 1;
    const c = canvas.getBoundingClientRect(), xs = [], ys = [];
    for (const [i, j] of [[-0.5, -0.5], [plane.columns - 0.5, -0.5], [-0.5, plane.rows - 0.5],
                          [plane.columns - 0.5, plane.rows - 0.5]]) {
      const [x, y] = viewport.worldToCanvas([0, 1, 2].map(k => p[k] + i * dx * rc[k] + j * dy * cc[k]));
      xs.push(c.left + x); ys.push(c.top + y);
    }
    out.image = [Math.max(Math.min(...xs), c.left), Math.max(Math.min(...ys), c.top),
                 Math.min(Math.max(...xs), c.right), Math.min(Math.max(...ys), c.bottom)];
  }
  out.ready = true;
  return out;
} catch (e) { return { ready: false, why: `probe: ${e}` }; } }
"""

# The microscopy mode draws with dicom-microscopy-viewer (OpenLayers) into a
# viewport of its own; it is ready when its map is in the page and no tile is
# on its way (the caller counts the requests).
_PROBE_MICROSCOPY = """
() => {
  const pane = document.querySelector('[data-viewportid]');
  const map = pane && pane.querySelector('.ol-viewport');
  if (!pane || !map) return { ready: false, why: 'no microscopy viewer yet' };
  if (!Array.from(map.querySelectorAll('canvas')).some(c => c.width > 0))
    return { ready: false, why: 'microscopy viewer has no canvas yet' };
  if (pane.querySelector('.loading') || document.querySelector('.infinite-loading-bar'))
    return { ready: false, why: 'loading indicator shown' };
  const r = pane.getBoundingClientRect();
  return { ready: true, viewportId: pane.dataset.viewportid, pane: [r.left, r.top, r.right, r.bottom] };
}
"""

# Notifications (sonner toasts) float over the viewport: keep their text, hide them.
_TAKE_NOTIFICATIONS = """
() => {
  const texts = Array.from(document.querySelectorAll('[data-sonner-toast]')).map(e => e.innerText.trim());
  if (!document.getElementById('aigw-hide-toasts')) {
    const style = document.createElement('style');
    style.id = 'aigw-hide-toasts';
    style.textContent = '[data-sonner-toaster] { display: none !important; }';
    document.head.appendChild(style);
  }
  return texts.filter(t => t);
}
"""

_SM_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_PM_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


class Viewer:
    """Orthanc with DICOMweb, OHIF in front of it and a headless Chromium, all on loopback.

    Use as a context manager; everything it starts is stopped on exit.

    Parameters
    ----------
    root : pathlib.Path or None
        Folder for Orthanc's data, the browser profile and logs; a temporary
        folder (removed on exit) when ``None``.
    dist : pathlib.Path or None
        OHIF's dist folder; see :func:`ohif_dist`.
    chromium : str or None
        The browser binary; ``$AIGW_CHROMIUM``, else ``chromium`` on ``PATH``.
    size : tuple of int
        The browser window in CSS pixels (device scale factor 1).
    use_cpu_rendering : bool
        Render with cornerstone's CPU path instead of WebGL.
    pacs_ae_title : str
        The AE title of the viewer's Orthanc (the PACS results are sent to).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        dist: Path | None = None,
        chromium: str | None = None,
        size: tuple[int, int] = (1280, 800),
        use_cpu_rendering: bool = False,
        pacs_ae_title: str = "ORTHANC",
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="aigw-viewer-")
            root = Path(self._tmp.name)
        self.root = root
        self.orthanc = Orthanc(root / "orthanc", ae_title=pacs_ae_title, dicomweb=True)
        self.ohif = OhifServer(self.orthanc.http_port, dist, use_cpu_rendering)
        self.chromium = chromium or os.environ.get("AIGW_CHROMIUM") or find_tool("chromium", "chromium-browser")
        self.size = size
        self._playwright: Playwright | None = None
        self._context: BrowserContext | None = None
        #: Errors and warnings of the last page, for a timeout's message.
        self.console: list[str] = []

    # -- lifecycle

    def start(self) -> Viewer:
        """Start Orthanc, the OHIF server and the browser."""
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as e:
            raise RuntimeError(_setup_hint("the Python package playwright is missing (extra [viewer])")) from e
        try:
            self.orthanc.start()
            self.ohif.start()
            self._playwright = sync_playwright().start()
            profile = self.root / "chromium-profile"
            shutil.rmtree(profile, ignore_errors=True)
            self._context = self._playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=self.chromium,
                headless=True,
                args=list(CHROMIUM_ARGS),
                viewport={"width": self.size[0], "height": self.size[1]},
                device_scale_factor=1,
                # OHIF registers a service worker; it would answer requests
                # from its cache that the proxy should see.
                service_workers="block",
            )
            self._context.add_init_script(_INIT_SCRIPT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the browser and stop the servers; safe to call twice."""
        try:
            if self._context is not None:
                self._context.close()
        finally:
            self._context = None
            try:
                if self._playwright is not None:
                    self._playwright.stop()
            finally:
                self._playwright = None
                self.ohif.stop()
                self.orthanc.stop()
                if self._tmp is not None:
                    self._tmp.cleanup()
                    self._tmp = None

    def __enter__(self) -> Viewer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- data

    def upload(self, files: Path | Iterable[Path]) -> list[dict[str, Any]]:
        """Store DICOM files in the viewer's Orthanc; see :meth:`Orthanc.upload`."""
        return self.orthanc.upload(files)

    def choose_mode(self, series_uid: str) -> tuple[ViewerMode, str]:
        """How to show a series, and why: by its SOP class, its references and its content.

        Known limits of OHIF 3.13 send a series to the fallback instead of
        into a viewport that would never finish (see the module docstring).
        """
        series = self.orthanc.get(f"/series/{self.orthanc.series_id(series_uid)}")
        first = self.orthanc.get(f"/instances/{series['Instances'][0]}/simplified-tags")
        sop_class = str(first.get("SOPClassUID", ""))
        modality = str(series["MainDicomTags"].get("Modality", ""))
        if sop_class == _SM_STORAGE or modality == "SM":
            conflict = _pyramid_conflict(self._instances(series_uid))
            if conflict:
                return ViewerMode.FALLBACK, conflict
            return ViewerMode.MICROSCOPY, "VL Whole Slide Microscopy: OHIF's microscopy mode"
        if self.ohif.use_cpu_rendering and sop_class in (_SEG_STORAGE, _PM_STORAGE):
            return ViewerMode.FALLBACK, "cornerstone's CPU rendering draws no labelmaps and no volume viewports"
        referenced = [str(r["SeriesInstanceUID"]) for r in first.get("ReferencedSeriesSequence") or []]
        if sop_class == _SEG_STORAGE and any(self._modality_of(uid) == "SM" for uid in referenced):
            return ViewerMode.FALLBACK, "OHIF 3.13 shows no SEG over a slide (no SEG handler in its microscopy mode)"
        if sop_class == _PM_STORAGE:
            frames = int(first.get("NumberOfFrames") or 1)
            for uid in referenced:
                with_source = self._instance_count(uid)
                if with_source > frames:
                    return ViewerMode.FALLBACK, (
                        f"OHIF 3.13 loads a Parametric Map only onto a source with one image per map frame "
                        f"({frames} frames, source series {with_source} images)"
                    )
        if modality == "SR" and not self._has_spatial_coordinates(series["Instances"][0]):
            return ViewerMode.FALLBACK, "OHIF draws an SR only from SCOORD/SCOORD3D content; this report has none"
        return ViewerMode.VIEWER, f"{modality or sop_class}: OHIF's basic viewer"

    def _modality_of(self, series_uid: str) -> str:
        try:
            return str(self.orthanc.get(f"/series/{self.orthanc.series_id(series_uid)}")["MainDicomTags"]["Modality"])
        except KeyError:
            return ""

    def _instance_count(self, series_uid: str) -> int:
        try:
            return len(self.orthanc.get(f"/series/{self.orthanc.series_id(series_uid)}")["Instances"])
        except KeyError:
            return 0

    def _has_spatial_coordinates(self, instance_id: str) -> bool:
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(self.orthanc.file(instance_id)), stop_before_pixels=True)
        stack = list(ds.get("ContentSequence", []))
        while stack:
            item = stack.pop()
            if item.get("ValueType") in ("SCOORD", "SCOORD3D"):
                return True
            stack.extend(item.get("ContentSequence", []))
        return False

    # -- screenshots

    def url_for(self, study_uid: str, series_uid: str, mode: ViewerMode) -> str:
        """The OHIF page that shows one series of a study in its main viewport.

        ``initialSeriesInstanceUID`` makes OHIF's hanging protocol put that
        series (or, for a SEG, its source with the SEG over it) in the first
        viewport of a one-viewport layout.
        """
        if mode is ViewerMode.FALLBACK:
            raise ValueError("the fallback opens no page")
        query = urllib.parse.urlencode({"StudyInstanceUIDs": study_uid, "initialSeriesInstanceUID": series_uid})
        return f"{self.ohif.url}/{mode.value}?{query}"

    def screenshot_series(
        self,
        study_uid: str,
        series_uid: str,
        out_png: Path,
        *,
        mode: ViewerMode | str | None = None,
        timeout: float = 90.0,
        fallback: bool = False,
    ) -> Screenshot:
        """Show one series, wait until its viewport has rendered and screenshot it.

        Parameters
        ----------
        study_uid, series_uid : str
            The series (already in the viewer's Orthanc, see :meth:`upload`).
        out_png : pathlib.Path
            Where the page screenshot goes; the viewport crop goes next to it
            as ``<stem>.viewport.png``.
        mode : ViewerMode or str or None
            How to show it; ``None`` lets :meth:`choose_mode` decide.
        timeout : float
            Seconds to wait for the rendered frame.
        fallback : bool
            When OHIF does not render within ``timeout``, return the fallback
            picture (with the reason in ``notes``) instead of raising.

        Raises
        ------
        TimeoutError
            When the viewport has not rendered within ``timeout`` (and not
            ``fallback``); the message says what the page was still waiting
            for and the page's last errors.
        """
        if self._context is None:
            raise RuntimeError("Viewer is not started")
        if mode is None:
            chosen, reason = self.choose_mode(series_uid)
        else:
            chosen, reason = ViewerMode(mode), "asked for"
        out_png.parent.mkdir(parents=True, exist_ok=True)
        viewport_png = out_png.with_name(out_png.stem + ".viewport.png")
        started = time.monotonic()
        if chosen is ViewerMode.FALLBACK:
            return self._fallback(series_uid, out_png, viewport_png, started, (reason,))
        url = self.url_for(study_uid, series_uid, chosen)
        try:
            probe, notes = self._open_and_wait(url, series_uid, chosen, out_png, started + timeout)
        except TimeoutError as e:
            if not fallback:
                raise
            log.warning("OHIF did not render series %s (%s); using the fallback", series_uid[-12:], e)
            return self._fallback(series_uid, out_png, viewport_png, started, (f"OHIF: {e}",))
        return self._crop(out_png, viewport_png, probe, chosen, url, time.monotonic() - started, notes)

    def _open_and_wait(
        self, url: str, series_uid: str, mode: ViewerMode, out_png: Path, deadline: float
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        assert self._context is not None
        self.console = []
        page = self._context.new_page()
        in_flight: set[Any] = set()
        page.on("console", lambda m: self._log_console(m.type, m.text))
        page.on("pageerror", lambda e: self._log_console("pageerror", str(e)))
        page.on("request", lambda r: in_flight.add(r) if "/dicom-web/" in r.url else None)
        page.on("requestfinished", lambda r: in_flight.discard(r))
        page.on("requestfailed", lambda r: in_flight.discard(r))
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=max(deadline - time.monotonic(), 1) * 1000)
            probe = self._wait_rendered(page, series_uid, mode, deadline, in_flight)
            notes = tuple(page.evaluate(_TAKE_NOTIFICATIONS))
            page.screenshot(path=str(out_png), animations="disabled", caret="hide")
        finally:
            page.close()
        return probe, notes

    def _log_console(self, kind: str, text: str) -> None:
        if kind in ("error", "pageerror", "warning"):
            self.console.append(f"{kind}: {text[:500]}")
            del self.console[:-200]

    def _wait_rendered(
        self, page: Page, series_uid: str, mode: ViewerMode, deadline: float, in_flight: set[Any]
    ) -> dict[str, Any]:
        from playwright.sync_api import Error as PlaywrightError

        script = _PROBE_MICROSCOPY if mode is ViewerMode.MICROSCOPY else _PROBE_CORNERSTONE
        previous = b""
        stable = 0
        while True:
            try:
                probe = dict(page.evaluate(script, series_uid))
            except PlaywrightError as e:
                # OHIF rewrites the URL as it boots; a poll may land in a
                # context that is being replaced.
                probe = {"ready": False, "why": f"page: {e.message.splitlines()[0]}"}
            if probe.get("ready") and mode is ViewerMode.MICROSCOPY and in_flight:
                probe = {"ready": False, "why": f"{len(in_flight)} tile requests in flight"}
            if probe.get("ready"):
                # The same pixels twice in a row, 250 ms apart: the frame is
                # final (tiles, overlays and SVG annotations included).
                left, top, right, bottom = probe["pane"]
                clip: FloatRect = {"x": left, "y": top, "width": max(right - left, 1), "height": max(bottom - top, 1)}
                shot = page.screenshot(clip=clip, type="jpeg", quality=40, animations="disabled", caret="hide")
                stable = stable + 1 if shot == previous else 0
                previous = shot
                if stable >= 2:
                    return probe
            else:
                stable, previous = 0, b""
            if time.monotonic() > deadline:
                errors = "\n".join(self.console[-8:])
                raise TimeoutError(f"viewport did not render: {probe.get('why', 'picture still changing')}\n{errors}")
            page.wait_for_timeout(250)

    def _crop(
        self,
        page_png: Path,
        viewport_png: Path,
        probe: dict[str, Any],
        mode: ViewerMode,
        url: str,
        seconds: float,
        notes: tuple[str, ...],
    ) -> Screenshot:
        from PIL import Image

        left, top, right, bottom = (round(v) for v in probe["pane"])
        with Image.open(page_png) as im:
            im.crop((left, top, right, bottom)).save(viewport_png)
        box = None
        if "image" in probe:
            x0, y0, x1, y1 = probe["image"]
            box = (round(x0) - left, round(y0) - top, round(x1) - left, round(y1) - top)
            if box[2] - box[0] < 4 or box[3] - box[1] < 4:
                box = None
        return Screenshot(page_png, viewport_png, image_stats(viewport_png, box), box, mode, url, seconds, notes)

    # -- the fallback

    def _fallback(
        self, series_uid: str, page_png: Path, viewport_png: Path, started: float, notes: tuple[str, ...]
    ) -> Screenshot:
        picture = self.fallback_picture(series_uid)
        picture.save(page_png)
        picture.save(viewport_png)
        return Screenshot(
            page_png,
            viewport_png,
            image_stats(viewport_png),
            None,
            ViewerMode.FALLBACK,
            "",
            time.monotonic() - started,
            notes,
        )

    def fallback_picture(self, series_uid: str, min_size: int = 512) -> PILImage:
        """A picture of a series without OHIF.

        * a SEG of a slide: its segments in red over the slide's pyramid level
          of at most 2048 columns, placed by the slide coordinates of both
          (PS3.3 C.8.12.9);
        * a slide: Orthanc's rendering of its THUMBNAIL, else of its largest
          one-frame level;
        * anything else: Orthanc's rendering of the middle instance's middle
          frame (``/instances/{id}/frames/{n}/preview``: full range, no VOI
          LUT); where Orthanc has none, for float pixel data (Parametric
          Maps) the frame through its own VOI window (PS3.3 C.7.6.16.2.10),
          for an SR its content tree as text.

        Small pictures (a slide SEG has a pixel per model tile) are enlarged
        without interpolation to ``min_size``.
        """
        from PIL import Image

        instances = self._instances(series_uid)
        first = instances[0][1]
        picture: PILImage | None = None
        if first.get("SOPClassUID") == _SEG_STORAGE:
            slides = [str(r["SeriesInstanceUID"]) for r in first.get("ReferencedSeriesSequence") or []]
            slides = [uid for uid in slides if self._modality_of(uid) == "SM"]
            if slides:
                level = _pick_level(self._instances(slides[0]), max_columns=2048)
                picture = _seg_over_slide(self.orthanc.file(instances[0][0]), self.orthanc.file(level))
        if picture is None:
            if first.get("SOPClassUID") == _SM_STORAGE:
                instance_id, frame = _pick_level(instances, single_frame=True), 0
            else:
                instance_id, tags = instances[len(instances) // 2]
                frame = int(tags.get("NumberOfFrames") or 1) // 2
            try:
                with Image.open(io.BytesIO(self.orthanc.rendered(instance_id, frame))) as png:
                    picture = png.copy()
            except RuntimeError:
                # HTTP 415: Orthanc has no decoder for these pixels, or there are none.
                picture = _render_dataset(self.orthanc.file(instance_id), frame)
        if min(picture.size) < min_size:
            scale = -(-min_size // max(min(picture.size), 1))
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
        return picture

    def _instances(self, series_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """(Orthanc id, simplified tags) of a series' instances by Instance Number."""
        out = []
        for item in self.orthanc.get(f"/series/{self.orthanc.series_id(series_uid)}/instances"):
            out.append((str(item["ID"]), dict(self.orthanc.get(f"/instances/{item['ID']}/simplified-tags"))))
        out.sort(key=lambda it: int(it[1].get("InstanceNumber") or 0))
        return out


def _flavour(tags: dict[str, Any]) -> str:
    """Image Type value 3 of a VL Whole Slide Microscopy image (PS3.3 C.8.12.4.1.1)."""
    value = tags.get("ImageType") or ""
    parts = value.split("\\") if isinstance(value, str) else list(value)
    return str(parts[2]) if len(parts) > 2 else ""


def _pyramid_conflict(instances: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Why dicom-microscopy-viewer would refuse a slide's pyramid; "" when it takes it.

    It builds one OpenLayers tile grid from the VOLUME and THUMBNAIL images,
    each at the zoom factor round(base columns / columns), and throws
    "`resolutions` must be sorted in descending order" when two sizes round
    to one factor (a thumbnail larger than the second level does).
    """
    sizes = {
        (int(t.get("TotalPixelMatrixColumns") or 0), _flavour(t))
        for _, t in instances
        if _flavour(t) in ("VOLUME", "THUMBNAIL") and t.get("TotalPixelMatrixColumns")
    }
    base = max((cols for cols, _ in sizes), default=0)
    by_factor: dict[int, list[str]] = {}
    for cols, flavour in sorted(sizes, reverse=True):
        by_factor.setdefault(round(base / cols), []).append(f"{flavour} {cols} px")
    clashes = [names for names in by_factor.values() if len(names) > 1]
    if not clashes:
        return ""
    return "dicom-microscopy-viewer in OHIF 3.13 needs one zoom factor per pyramid image; " + "; ".join(
        " and ".join(names) + " round to the same" for names in clashes
    )


def _pick_level(
    instances: Sequence[tuple[str, dict[str, Any]]], max_columns: int | None = None, single_frame: bool = False
) -> str:
    """The slide image to draw: the THUMBNAIL or largest one-frame level, or the largest level up to a width."""

    def columns(tags: dict[str, Any]) -> int:
        return int(tags.get("TotalPixelMatrixColumns") or tags.get("Columns") or 0)

    if single_frame:
        thumbnails = [i for i, t in instances if _flavour(t) == "THUMBNAIL"]
        if thumbnails:
            return thumbnails[0]
    volumes = [(i, t) for i, t in instances if _flavour(t) == "VOLUME"]
    if single_frame:
        candidates = [(i, t) for i, t in volumes if int(t.get("NumberOfFrames") or 1) == 1]
    else:
        candidates = [(i, t) for i, t in volumes if columns(t) <= (max_columns or 1 << 30)]
    # Nothing fits: the smallest level.
    candidates = candidates or sorted(volumes, key=lambda it: columns(it[1]))[:1]
    if not candidates:
        raise RuntimeError("the slide has no VOLUME image to draw")
    return max(candidates, key=lambda it: columns(it[1]))[0]


def _slide_grid(ds: Any) -> tuple[Any, Any, Any]:
    """Origin and the two pixel steps (mm, slide coordinates) of a total pixel matrix (PS3.3 C.8.12.9)."""
    import numpy as np

    origin = ds.TotalPixelMatrixOriginSequence[0]
    o = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
    cosines = np.array([float(v) for v in ds.ImageOrientationSlide])
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    # Along a row (next column) is the first direction; down a column the second.
    return o, cosines[:2] * float(spacing[1]), cosines[3:5] * float(spacing[0])


def _total_pixel_matrix(ds: Any) -> Any:
    """The stitched total pixel matrix of a tiled slide image, as stored (RGB)."""
    import numpy as np

    frames = np.asarray(ds.pixel_array)
    if int(ds.get("NumberOfFrames") or 1) == 1:
        frames = frames[None]
    rows, cols = int(ds.Rows), int(ds.Columns)
    total = np.zeros((int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns), *frames.shape[3:]), frames.dtype)
    per_row = -(-total.shape[1] // cols)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    for k, tile in enumerate(frames):
        if per_frame is not None and "PlanePositionSlideSequence" in per_frame[k]:
            pos = per_frame[k].PlanePositionSlideSequence[0]
            top, left = (
                int(pos.RowPositionInTotalImagePixelMatrix) - 1,
                int(pos.ColumnPositionInTotalImagePixelMatrix) - 1,
            )
        else:
            # TILED_FULL (PS3.3 C.7.6.17.3): row by row, one focal plane and optical path.
            top, left = (k // per_row) * rows, (k % per_row) * cols
        h, w = min(rows, total.shape[0] - top), min(cols, total.shape[1] - left)
        if h > 0 and w > 0:
            total[top : top + h, left : left + w] = tile[:h, :w]
    return total


def _seg_over_slide(seg_file: bytes, level_file: bytes) -> PILImage:
    """A slide SEG's segments (max over segments, as probability) in red over one pyramid level."""
    import highdicom as hd
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    seg = hd.seg.Segmentation.from_dataset(dcmread(io.BytesIO(seg_file)))
    level = dcmread(io.BytesIO(level_file))
    slide = _total_pixel_matrix(level).astype(np.float64)
    if slide.ndim == 2:
        slide = np.repeat(slide[..., None], 3, axis=2)
    prob = (
        np.asarray(seg.get_total_pixel_matrix(combine_segments=False, rescale_fractional=True), dtype=np.float64)
        .reshape(int(seg.TotalPixelMatrixRows), int(seg.TotalPixelMatrixColumns), -1)
        .max(axis=2)
    )
    if seg.SegmentationType == "FRACTIONAL" and prob.max() > 1:
        prob = prob / float(seg.MaximumFractionalValue)
    # Every level pixel's centre in slide coordinates, then in SEG pixels.
    o, du, dv = _slide_grid(level)
    so, su, sv = _slide_grid(seg)
    r, c = np.mgrid[0 : slide.shape[0], 0 : slide.shape[1]]
    points = o + c[..., None] * du + r[..., None] * dv - so
    sc = np.rint(points @ su / (su @ su)).astype(int)
    sr = np.rint(points @ sv / (sv @ sv)).astype(int)
    inside = (sr >= 0) & (sr < prob.shape[0]) & (sc >= 0) & (sc < prob.shape[1])
    alpha = np.zeros(slide.shape[:2])
    alpha[inside] = 0.6 * np.clip(prob[sr[inside], sc[inside]], 0, 1)
    red = np.array([255.0, 0.0, 0.0])
    out = slide * (1 - alpha[..., None]) + red * alpha[..., None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


def _render_dataset(data: bytes, frame: int) -> PILImage:
    """One frame of a data set as 8-bit grey through its VOI window, or an SR as text."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    if "ContentSequence" in ds and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return _render_sr(ds)
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        pixels = pixels[frame]
    # The frame's own functional groups first, then the shared ones (PS3.3 C.7.6.16).
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    groups.extend(ds.get("SharedFunctionalGroupsSequence") or [])
    # The window applies to the Modality LUT's output (PS3.3 C.11.2.1.2).
    rescale = [g.PixelValueTransformationSequence[0] for g in groups if "PixelValueTransformationSequence" in g]
    source = rescale[0] if rescale else ds
    if "RescaleSlope" in source:
        pixels = pixels * float(source.RescaleSlope) + float(source.get("RescaleIntercept", 0))
    windows = [g.FrameVOILUTSequence[0] for g in groups if "FrameVOILUTSequence" in g]
    centre = width = None
    if windows:
        centre, width = float(np.ravel(windows[0].WindowCenter)[0]), float(np.ravel(windows[0].WindowWidth)[0])
    elif "WindowCenter" in ds:
        centre, width = float(np.ravel(ds.WindowCenter)[0]), float(np.ravel(ds.WindowWidth)[0])
    if centre is None or not width:
        lo, hi = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        centre, width = (lo + hi) / 2, max(hi - lo, 1e-12)
    grey = np.clip((pixels - (centre - width / 2)) / width * 255.0, 0, 255)
    return Image.fromarray(np.nan_to_num(grey).astype(np.uint8), mode="L")


def _render_sr(ds: Any, size: tuple[int, int] = (1024, 768)) -> PILImage:
    """An SR's content tree as white text on black, one content item a line."""
    from PIL import Image, ImageDraw, ImageFont

    lines = [f"{ds.get('SeriesDescription', '')}".strip() or "Structured Report"]

    def walk(items: Sequence[Any], depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            value = ""
            if "TextValue" in item:
                value = str(item.TextValue)
            elif "ConceptCodeSequence" in item:
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif "MeasuredValueSequence" in item and item.MeasuredValueSequence:
                measured = item.MeasuredValueSequence[0]
                unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
                value = f"{measured.NumericValue} {unit}"
            elif "ReferencedSOPSequence" in item:
                value = f"-> {item.ReferencedSOPSequence[0].ReferencedSOPClassUID.name}"
            if item.get("RelationshipType") in ("CONTAINS", "HAS PROPERTIES") or value:
                lines.append("  " * depth + (f"{name}: {value}" if value else name))
            walk(item.get("ContentSequence", []), depth + 1)

    walk(ds.get("ContentSequence", []), 1)
    try:
        font: Any = ImageFont.truetype("DejaVuSans.ttf", 16)
    except OSError:
        font = ImageFont.load_default()
    picture = Image.new("L", size, 0)
    draw = ImageDraw.Draw(picture)
    for k, line in enumerate(lines[: size[1] // 20]):
        draw.text((12, 10 + 20 * k), line, fill=255, font=font)
    return picture
