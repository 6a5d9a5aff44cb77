"""``aigw demo``: the whole path on one machine, from scanner to PACS, with a report.

The demo starts the gateway in-process and, as the PACS (``DEMO_PACS``), a
real Orthanc with its DICOMweb plugin and the OHIF viewer in front of it,
all on free loopback ports (:mod:`gateway.apps.viewer`). Every available pipeline
that implements :class:`gateway.contract.DemoCapable` writes a synthetic
study; the demo sends each series in with C-STORE on one association as a
scanner does (calling AE ``DEMO_SCANNER``), waits until the results are back
at ``DEMO_PACS``, opens the input and every result series in OHIF in
headless Chromium, and writes a self-contained ``report.html``: a summary
table, the viewer's screenshots and the pipelines' previews side by side,
the timings and where every DICOM file lies. With ``keep_open`` it then
prints the OHIF address and keeps serving until Ctrl-C, so a person can
look.

Where Orthanc, OHIF or Chromium are not installed (or ``viewer=False``),
the demo falls back to a built-in C-STORE SCP as ``DEMO_PACS`` and says in
the report that it has no viewer screenshots.

Layout of the demo folder::

    .aigw-demo                          marker: this folder belongs to the demo
    input/<pipeline>/                   the synthetic studies as sent
    gateway-data/                       the gateway's data dir (store, jobs, index)
    received/<series>/<sop>.dcm         what DEMO_PACS received, bit-exact
    screenshots/<n>-<pipeline>-*.png     OHIF screenshots: page, and .viewport.png crops
    viewer/                             Orthanc's database and log, the browser profile
    gateway.log                         the gateway's log for this run

Everything stays on the machine and nothing is downloaded, so the demo runs
offline. The exit status is 0 only if every series came back.

The modules, in the order the demo uses them: :mod:`~gateway.apps.demo.run`
(the demo folder, the gateway's settings, the run itself),
:mod:`~gateway.apps.demo.pacs` (``DEMO_PACS``), :mod:`~gateway.apps.demo.series`
(each series' record, waiting for results), :mod:`~gateway.apps.demo.scanner`
(``DEMO_SCANNER``'s C-STORE), :mod:`~gateway.apps.demo.previews` and
:mod:`~gateway.apps.demo.screenshots` (the pictures) and
:mod:`~gateway.apps.demo.report` (``report.html``).
"""

from gateway.apps.demo.pacs import PACS_AE, OrthancNode, Pacs, Received, ReceivingNode
from gateway.apps.demo.run import MARKER, DemoError, run_demo
from gateway.apps.demo.scanner import SCANNER_AE

__all__ = [
    "MARKER",
    "PACS_AE",
    "SCANNER_AE",
    "DemoError",
    "OrthancNode",
    "Pacs",
    "Received",
    "ReceivingNode",
    "run_demo",
]
