"""``aigw demo`` itself: the demo folder, the gateway with the demo's settings, and the run from scanner to report."""

from __future__ import annotations

import logging
import shutil
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.apps.demo._console import Console, secs
from gateway.apps.demo.pacs import PACS_AE, OrthancNode, Pacs, ReceivingNode
from gateway.apps.demo.previews import make_previews
from gateway.apps.demo.report import write_report
from gateway.apps.demo.scanner import send_series
from gateway.apps.demo.screenshots import start_viewer, take_screenshots
from gateway.apps.demo.series import PipelineNote, SeriesRun, series_of, wait_for_results
from gateway.config import Config, Destination, load_config

if TYPE_CHECKING:
    from gateway.apps.viewer import Viewer
    from gateway.contract import Pipeline
    from gateway.service import Gateway

__all__ = ["MARKER", "DemoError", "run_demo"]

log = logging.getLogger(__name__)


#: Written into the demo folder; only a folder holding it is ever emptied.
MARKER = ".aigw-demo"


# Settings the demo imposes whatever the configuration file says: it must not
# touch a real data dir, database, port or PACS, and it must finish quickly.
# The file still contributes plugins, models, routes, pipeline options and
# identity.
_QUICK: Mapping[str, Any] = {
    # Each series arrives on its own association, so the release hint
    # (PS3.8 A-RELEASE) completes it; the timer is only the fallback.
    "completion.series_timeout_seconds": 3.0,
    "completion.release_quiet_seconds": 0.5,
    "completion.hint_quiet_seconds": 0.5,
    # A failing job gives up in seconds instead of minutes.
    "jobs.backoff_seconds": 1.0,
    "jobs.backoff_max_seconds": 4.0,
    "send.backoff_seconds": 1.0,
    "send.backoff_max_seconds": 4.0,
    "send.timeout_seconds": 30.0,
    # The demo writes a few megabytes; the 2 GiB production watermark would
    # refuse it on a nearly full laptop for no benefit.
    "gateway.min_free_bytes": 64 * 1024**2,
}


class DemoError(RuntimeError):
    """The demo cannot start (for example the demo folder belongs to something else)."""


def _prepare_out(out: Path) -> None:
    """Make ``out`` an empty demo folder, emptying only a previous demo's folder.

    Raises
    ------
    DemoError
        If ``out`` is a file, or a non-empty folder without the demo's marker:
        it may hold someone's data, so it is left alone.
    """
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(
                f"{out} is not empty and was not made by 'aigw demo' (no {MARKER} file in it); "
                "refusing to delete anything there: choose another --out or empty it yourself"
            )
        for child in out.iterdir():
            # A symlink is removed, never followed: only the demo's own files go.
            if child.is_symlink() or not child.is_dir():
                child.unlink()
            else:
                shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"made by aigw {__version__} demo; this folder is emptied by the next demo run\n")


@contextmanager
def _demo_logging(path: Path, level: str) -> Iterator[None]:
    """Send all log records to ``path`` for the duration, then restore the root logger.

    The console belongs to the progress lines; the gateway's own log, stack
    traces of failing jobs included, goes to the file the report points to.
    """
    from pynetdicom import _config as pnd_config

    root = logging.getLogger()
    pnd = logging.getLogger("pynetdicom")
    saved = (root.handlers[:], root.level, pnd.level)
    saved_ids = (pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom narrates every association at INFO, and its identifier
    # logging would put data set values in the log.
    pnd.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    pnd_config.LOG_REQUEST_IDENTIFIERS = False
    pnd_config.LOG_RESPONSE_IDENTIFIERS = False
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pnd.setLevel(saved[2])
        pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS = saved_ids
        handler.close()


def _demo_config(config_path: Path | None, data_dir: Path, pacs_port: int) -> Config:
    """The effective configuration: the file (if any) with the demo's own settings on top."""
    overrides: dict[str, Any] = {
        "gateway.data_dir": str(data_dir),
        # Named explicitly so a database_url in the file (a site's PostgreSQL)
        # is never written to by the demo.
        "gateway.database_url": f"sqlite:///{data_dir / 'index.sqlite'}",
        "gateway.host": "127.0.0.1",
        "gateway.port": 0,
        "metrics.host": "127.0.0.1",
        "metrics.port": 0,
        "destinations": [Destination(name="demo_pacs", ae_title=PACS_AE, host="127.0.0.1", port=pacs_port)],
        **_QUICK,
    }
    return load_config(config_path, overrides)


def _demo_capable(pipeline: Pipeline) -> bool:
    # demo_preview is optional, so DemoCapable's isinstance check (which wants
    # both hooks) would turn away pipelines that only generate data.
    return callable(getattr(pipeline, "demo_study", None))


def _seed(name: str) -> int:
    """A seed per pipeline that is the same on every run (reproducible studies)."""
    return zlib.crc32(name.encode()) % 1_000_000 + 1


def run_demo(
    out: Path,
    report: Path,
    timeout: float,
    config_path: Path | None = None,
    *,
    viewer: bool = True,
    keep_open: bool = False,
) -> int:
    """Run the end-to-end demo and write the report.

    Parameters
    ----------
    out : Path
        Demo folder. Emptied first if a previous demo made it; a non-empty
        folder the demo did not make is refused.
    report : Path
        Where to write ``report.html``.
    timeout : float
        Seconds to wait for results after the last series was sent.
    config_path : Path, optional
        A gateway configuration file for plugins, models, routes and pipeline
        options. The demo overrides ports, data dir, database, destinations
        and timing settings so it never touches a real installation.
    viewer : bool
        Use Orthanc with OHIF as the PACS and screenshot every result in the
        viewer (the default); False uses the built-in receiving node.
    keep_open : bool
        After the report, print the viewer's address and keep Orthanc and
        OHIF serving until Ctrl-C.

    Returns
    -------
    int
        0 if every series came back, 1 if any did not or no pipeline has demo
        data, 2 if the demo could not start.
    """
    from gateway.service import Gateway

    console = Console()
    started = time.time()
    out = Path(out).resolve()
    report = Path(report).resolve()
    # Read the file before touching anything: a ConfigError names file, key
    # and reason, and the demo folder is left as it was.
    level = load_config(config_path).logging.level
    try:
        _prepare_out(out)
    except DemoError as exc:
        print(f"aigw demo: {exc}", file=sys.stderr)
        return 2
    runs: list[SeriesRun] = []
    notes: list[PipelineNote] = []
    config: Config | None = None
    gw: Gateway | None = None
    seen: Viewer | None = None
    pacs: Pacs | None = None
    with _demo_logging(out / "gateway.log", level):
        try:
            log.info("aigw %s demo in %s", __version__, out)
            viewer_note: str | None = "viewer screenshots switched off (--no-viewer)"
            if viewer:
                seen, why = start_viewer(out / "viewer", console)
                viewer_note = f"no viewer screenshots: the viewer could not start ({why})" if why else None
            if seen is not None:
                pacs = OrthancNode(seen.orthanc, out / "received")
                pacs.start()
            else:
                pacs = ReceivingNode(out / "received")
                pacs.start()
                console.say(f"receiving node {PACS_AE} listening on 127.0.0.1:{pacs.port}")
            assert pacs.port is not None
            config = _demo_config(config_path, out / "gateway-data", pacs.port)
            gw = Gateway(config)
            available = gw.plugins.available
            unavailable = dict(gw.plugins.unavailable)
            capable = {n: p for n, p in sorted(available.items()) if _demo_capable(p)}
            notes = [
                PipelineNote(n, "no demo data (the pipeline has no demo_study hook)")
                for n in sorted(available)
                if n not in capable
            ]

            def save_report(verdict: str, ok: bool) -> None:
                write_report(
                    report,
                    out=out,
                    config=config,
                    config_path=config_path,
                    runs=runs,
                    notes=notes,
                    unavailable=unavailable,
                    verdict=verdict,
                    ok=ok,
                    started=started,
                    duration=console.elapsed(),
                    viewer_note=viewer_note,
                )

            if not capable:
                verdict = "demo not run: no available pipeline provides demo data"
                _explain_nothing_to_do(available, unavailable, gw.models.root)
                save_report(verdict, False)
                print(f"report: {report}", file=sys.stderr)
                return 1

            gw.start()
            console.say(
                f"gateway {config.gateway.ae_title} listening on 127.0.0.1:{gw.dicom_port}; "
                f"pipelines: {', '.join(capable)}"
            )

            for name, pipeline in capable.items():
                folder = out / "input" / name
                console.say(f"{name}: generating the demo study")
                try:
                    files = list(pipeline.demo_study(folder, _seed(name)))  # type: ignore[attr-defined]
                    if not files:
                        raise ValueError("demo_study returned no files")
                    series = series_of(name, files)
                except Exception as exc:
                    log.exception("demo_study of %s failed", name)
                    notes.append(PipelineNote(name, f"demo_study failed: {type(exc).__name__}: {exc}"))
                    continue
                console.say(f"{name}: {len(files)} file(s) in {len(series)} series")
                runs.extend(series)

            assert gw.dicom_port is not None
            for i, run in enumerate(runs, 1):
                label = f"series {i}/{len(runs)} ({run.pipeline}, {len(run.files)} instances)"
                send_series(run, gw.dicom_port, config.gateway.ae_title, console, label)
                console.say(
                    f"{label}: sent in {secs(run.send_seconds)}" + (f" - {run.send_error}" if run.send_error else "")
                )

            if runs:
                wait_for_results(runs, gw, pacs, timeout, console)
            for run in runs:
                if run.outputs or run.files:
                    make_previews(run, available.get(run.pipeline))
            if seen is not None:
                take_screenshots(runs, seen, out / "screenshots", console)

            failed_gen = [n for n in notes if n.reason.startswith("demo_study failed")]
            back = sum(r.ok for r in runs)
            ok = bool(runs) and back == len(runs) and not failed_gen
            verdict = _verdict(runs, failed_gen, ok, console.elapsed())
            save_report(verdict, ok)
            for run in runs:
                if not run.ok:
                    print(f"  {run.pipeline} series {run.ref}: {run.status}: {run.error}", file=sys.stderr)
            for note in failed_gen:
                print(f"  {note.name}: {note.reason}", file=sys.stderr)
            print(f"report: {report}", file=sys.stderr)
            print(verdict)
            if keep_open:
                _keep_open(seen, runs, gw, console)
            return 0 if ok else 1
        except KeyboardInterrupt:
            console.say(f"interrupted: stopping the gateway and {PACS_AE}")
            raise
        finally:
            # Also on Ctrl-C: no listener or worker thread outlives the demo.
            if gw is not None:
                try:
                    gw.stop()  # also closes the index of a gateway that never started
                except Exception:
                    log.exception("stopping the gateway failed")
            if pacs is not None:
                pacs.stop()
            if seen is not None:
                seen.stop()


def _keep_open(viewer: Viewer | None, runs: Sequence[SeriesRun], gw: Gateway, console: Console) -> None:
    """Keep serving until Ctrl-C, so a person can look at the results in OHIF."""
    if viewer is None:
        console.say("--keep-open: there is no viewer to keep open (see the report)")
        return
    print(f"OHIF viewer: {viewer.ohif.url}/  (study list; Orthanc: {viewer.orthanc.url}/)", file=sys.stderr)
    for run in runs:
        for shot in run.screenshots:
            if shot.url:
                print(f"  {run.pipeline}: {shot.title}: {shot.url}", file=sys.stderr)
    print(
        f"gateway {gw.config.gateway.ae_title} on 127.0.0.1:{gw.dicom_port} sends results there; Ctrl-C stops all",
        file=sys.stderr,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.say("stopping")


def _verdict(runs: Sequence[SeriesRun], failed_gen: Sequence[PipelineNote], ok: bool, seconds: float) -> str:
    back = sum(r.ok for r in runs)
    if ok:
        return f"demo OK: {back}/{len(runs)} series came back with results in {seconds:.1f} s"
    problems = [f"{len(runs) - back} of {len(runs)} series did not come back"]
    if failed_gen:
        problems.append(f"{len(failed_gen)} pipeline(s) could not generate demo data")
    return f"demo FAILED: {'; '.join(problems)} ({seconds:.1f} s)"


def _explain_nothing_to_do(available: Mapping[str, Any], unavailable: Mapping[str, str], models_dir: Path) -> None:
    lines = ["aigw demo: no available pipeline provides demo data, so there is nothing to send."]
    if available:
        lines.append(f"  available without demo data: {', '.join(sorted(available))}")
    for name, why in sorted(unavailable.items()):
        lines.append(f"  unavailable: {name}: {why}")
    if not available and not unavailable:
        lines.append(
            "  no pipeline plugin is installed: install a pipeline package (entry point group"
            " 'aigw.pipelines') or name one with plugins = [\"module:factory\"] in a file given with --config"
        )
    lines.append(f"  models dir: {models_dir}")
    print("\n".join(lines), file=sys.stderr)
