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

The modules: :mod:`~gateway.apps.viewer.orthanc` (the PACS),
:mod:`~gateway.apps.viewer.ohif` (the viewer's web server and DICOMweb proxy),
:mod:`~gateway.apps.viewer.browser` (Chromium, the screenshots),
:mod:`~gateway.apps.viewer.modes` (how each kind of series is shown) and
:mod:`~gateway.apps.viewer.pictures` (the fallback pictures, the pixel
statistics).
"""

from gateway.apps.viewer._tools import find_tool, free_port
from gateway.apps.viewer.browser import Screenshot, Viewer
from gateway.apps.viewer.modes import ViewerMode, choose_mode
from gateway.apps.viewer.ohif import OhifServer, app_config, ohif_dist
from gateway.apps.viewer.orthanc import Orthanc
from gateway.apps.viewer.pictures import ImageStats, fallback_picture, image_stats

__all__ = [
    "ImageStats",
    "OhifServer",
    "Orthanc",
    "Screenshot",
    "Viewer",
    "ViewerMode",
    "app_config",
    "choose_mode",
    "fallback_picture",
    "find_tool",
    "free_port",
    "image_stats",
    "ohif_dist",
]
