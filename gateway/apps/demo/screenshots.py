"""The demo's series in OHIF: starting the viewer, and a screenshot of the input and every result series."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from gateway.apps.demo._console import Console
from gateway.apps.demo.pacs import PACS_AE
from gateway.apps.demo.series import SeriesRun, ViewerShot

if TYPE_CHECKING:
    from gateway.apps.viewer import Viewer

__all__ = ["start_viewer", "take_screenshots"]

log = logging.getLogger(__name__)


def take_screenshots(runs: Sequence[SeriesRun], viewer: Viewer, folder: Path, console: Console) -> None:
    """Open each series that came back, its input and every result series, in OHIF; screenshot each."""
    from gateway.apps.viewer import ViewerMode

    fallback = ViewerMode.FALLBACK
    for i, run in enumerate(runs, 1):
        if not run.ok or run.study_uid is None:
            continue
        try:
            viewer.upload(run.files)  # the scanner's series, so the results are seen next to it
            results: dict[str, Path] = {}
            for received in run.outputs:
                results.setdefault(received.series_uid, received.path)
            heads = [dcmread(run.files[0], stop_before_pixels=True)]
            heads += sorted(
                (dcmread(p, stop_before_pixels=True) for p in results.values()),
                key=lambda h: (int(h.get("SeriesNumber") or 0), str(h.SeriesInstanceUID)),
            )
            source_modality = str(heads[0].get("Modality", ""))
            for k, head in enumerate(heads):
                kind = "input" if k == 0 else f"result {k}"
                what = str(head.get("SeriesDescription", "") or head.get("Modality", ""))
                png = folder / f"{i:02d}-{run.pipeline}-{'input' if k == 0 else f'result{k}'}.png"
                series_uid = str(head.SeriesInstanceUID)
                shot = viewer.screenshot_series(str(head.StudyInstanceUID), series_uid, png)
                problems = tuple(shot.stats.problems(**_look(str(head.get("Modality", "")), source_modality)))
                # Say so where OHIF could not show the type and the harness drew it instead.
                shown_by = "fallback picture (OHIF 3.13 cannot show it)" if shot.mode is fallback else "OHIF"
                title = f"{shown_by}, {kind}: {what}"
                png_shown = shot.viewport_png
                run.screenshots.append(ViewerShot(title, png_shown, series_uid, shot.url, problems, shot.seconds))
                note = f" - LOOKS WRONG: {'; '.join(problems)}" if problems else ""
                console.say(f"{run.pipeline}: {kind} '{what}' in the viewer ({shot.seconds:.1f} s){note}")
        except Exception as exc:
            log.exception("viewer screenshots of demo series %s failed", run.ref)
            run.screenshot_error = f"{type(exc).__name__}: {exc}"
            console.say(f"{run.pipeline}: viewer screenshots failed: {run.screenshot_error}")


def _look(modality: str, source_modality: str) -> dict[str, Any]:
    """Limits of :meth:`ImageStats.problems` that fit what a series looks like when shown well."""
    if modality == "SR":  # a page of text: mostly background, few grey levels
        return {"max_black": 0.995, "max_uniform": 0.995, "min_levels": 2, "min_std": 1.0}
    if "SM" in (modality, source_modality):  # brightfield: mostly white glass around the tissue
        return {"max_white": 0.98, "max_uniform": 0.98}
    return {}


def start_viewer(root: Path, console: Console) -> tuple[Viewer | None, str | None]:
    """Orthanc + OHIF + Chromium, or None and why not (the demo then runs without them)."""
    try:
        from gateway.apps.viewer import Viewer

        viewer = Viewer(root, pacs_ae_title=PACS_AE).start()
    except Exception as exc:
        log.warning("viewer unavailable: %s", exc, exc_info=True)
        console.say(f"viewer unavailable, using the built-in receiving node without screenshots: {exc}")
        return None, f"{type(exc).__name__}: {exc}"
    console.say(f"PACS {PACS_AE}: Orthanc on 127.0.0.1:{viewer.orthanc.dicom_port}; viewer: {viewer.ohif.url}")
    return viewer, None
