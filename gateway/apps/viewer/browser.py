"""OHIF in a headless Chromium: :class:`Viewer` opens one series, waits until it has drawn and screenshots it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gateway.apps.viewer._probes import INIT_SCRIPT, PROBE_CORNERSTONE, PROBE_MICROSCOPY, TAKE_NOTIFICATIONS
from gateway.apps.viewer._tools import find_tool, setup_hint
from gateway.apps.viewer.modes import ViewerMode, choose_mode
from gateway.apps.viewer.ohif import OhifServer
from gateway.apps.viewer.orthanc import Orthanc
from gateway.apps.viewer.pictures import ImageStats, fallback_picture, image_stats

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
    from playwright.sync_api import BrowserContext, FloatRect, Page, Playwright

__all__ = ["CHROMIUM_ARGS", "Screenshot", "Viewer"]

log = logging.getLogger(__name__)


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
            raise RuntimeError(setup_hint("the Python package playwright is missing (extra [viewer])")) from e
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
            self._context.add_init_script(INIT_SCRIPT)
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
        """How to show a series, and why; see :func:`~gateway.apps.viewer.modes.choose_mode`."""
        return choose_mode(self.orthanc, series_uid, use_cpu_rendering=self.ohif.use_cpu_rendering)

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
            notes = tuple(page.evaluate(TAKE_NOTIFICATIONS))
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

        script = PROBE_MICROSCOPY if mode is ViewerMode.MICROSCOPY else PROBE_CORNERSTONE
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
        """A picture of a series without OHIF; see :func:`~gateway.apps.viewer.pictures.fallback_picture`."""
        return fallback_picture(self.orthanc, series_uid, min_size)
