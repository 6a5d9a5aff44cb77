"""``report.html``: one self-contained page, screenshots and previews inline as data URIs."""

from __future__ import annotations

import base64
import html
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway import __version__
from gateway.apps.demo._console import secs
from gateway.apps.demo.pacs import PACS_AE
from gateway.apps.demo.scanner import SCANNER_AE
from gateway.apps.demo.series import PipelineNote, SeriesRun
from gateway.config import Config
from gateway.uids import InvalidUID, checked_uid

__all__ = ["write_report"]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{margin-bottom:.2em} .verdict{font-size:1.2em;padding:.6em 1em;border-radius:6px;display:inline-block}
.ok{background:#e3f6e5;color:#14591f} .bad{background:#fde7e7;color:#8a1111}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
section{border-top:1px solid #ddd;margin-top:2em;padding-top:1em}
figure{display:inline-block;margin:0 1em 1em 0;text-align:center} figure img{border:1px solid #999;image-rendering:auto}
figcaption{font-size:.9em;color:#555;max-width:256px;overflow-wrap:anywhere}
img.shot{max-width:360px} figure:has(img.shot) figcaption{max-width:360px}
code{background:#f6f6f6;padding:0 .2em;overflow-wrap:anywhere} .muted{color:#666}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _status_cell(run: SeriesRun) -> str:
    cls = "ok" if run.ok else "bad"
    text = "back" if run.ok else run.status.upper()
    return f'<td class="{cls}">{_e(text)}</td>'


def write_report(
    report: Path,
    *,
    out: Path,
    config: Config | None,
    config_path: Path | None,
    runs: Sequence[SeriesRun],
    notes: Sequence[PipelineNote],
    unavailable: Mapping[str, str],
    verdict: str,
    ok: bool,
    started: float,
    duration: float,
    viewer_note: str | None = None,
) -> None:
    """Write the self-contained report (previews inline as data URIs)."""
    data_dir = config.gateway.data_dir if config is not None else out / "gateway-data"
    p: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>aigw demo report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>aigw demo report</h1>",
        f'<p class="verdict {"ok" if ok else "bad"}">{_e(verdict)}</p>',
        "<p class='muted'>"
        f"aigw {_e(__version__)} &middot; run {_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started)))}"
        f" &middot; {duration:.1f} s in all &middot; {_e(platform.platform())}, {os.cpu_count() or '?'} CPU(s)"
        f" &middot; configuration: {_e(config_path or 'embedded defaults')}</p>",
        "<p>A scanner (<code>" + SCANNER_AE + "</code>) sent each synthetic series to the gateway with C-STORE,"
        " one association per series. The gateway stored it, completed it, ran the pipeline and sent the"
        " results to the PACS <code>" + PACS_AE + "</code>.</p>",
        f"<p class='muted'>{_e(viewer_note)}</p>" if viewer_note else "",
        "<h2>Summary</h2>",
        "<table><tr><th>Pipeline</th><th>Series</th><th>Instances in</th><th>Outputs back</th>"
        "<th>Send</th><th>Completion after send</th><th>Job</th><th>First sent &rarr; last result</th>"
        "<th>Status</th></tr>",
    ]
    for i, run in enumerate(runs, 1):
        p.append(
            f"<tr><td>{_e(run.pipeline)}</td>"
            f'<td><a href="#s{i}">series {i}</a> <span class="muted">({_e(run.ref)})</span></td>'
            f'<td class="num">{run.accepted}/{len(run.files)}</td><td class="num">{len(run.outputs)}</td>'
            f'<td class="num">{secs(run.send_seconds)}</td><td class="num">{secs(run.completion_seconds)}</td>'
            f'<td class="num">{secs(run.job_seconds)}</td><td class="num">{secs(run.end_to_end_seconds)}</td>'
            f"{_status_cell(run)}</tr>"
        )
    if not runs:
        p.append('<tr><td colspan="9" class="muted">no series: no available pipeline provides demo data</td></tr>')
    p.append("</table>")
    if notes or unavailable:
        p.append("<h2>Pipelines without a demo series</h2><ul>")
        for note in notes:
            p.append(f"<li><b>{_e(note.name)}</b>: {_e(note.reason)}</li>")
        for name, why in sorted(unavailable.items()):
            p.append(f"<li><b>{_e(name)}</b>: unavailable: {_e(why)}</li>")
        p.append("</ul>")

    for i, run in enumerate(runs, 1):
        p.append(f'<section id="s{i}"><h2>Series {i}: {_e(run.pipeline)}</h2>')
        if run.error:
            p.append(f'<p class="verdict bad">{_e(run.status)}: {_e(run.error)}</p>')
        if run.send_error and run.accepted:
            p.append(f"<p class='bad'>while sending: {_e(run.send_error)}</p>")
        if run.screenshots:
            p.append("<h3>In the viewer (OHIF over Orthanc's DICOMweb)</h3><div>")
            for shot in run.screenshots:
                b64 = base64.b64encode(shot.path.read_bytes()).decode("ascii")
                warn = f"<br><b class='bad'>looks wrong: {_e('; '.join(shot.problems))}</b>" if shot.problems else ""
                p.append(
                    f'<figure><img class="shot" alt="{_e(shot.title)}" src="data:image/png;base64,{b64}">'
                    f"<figcaption>{_e(shot.title)}<br><code>{_e(shot.path.name)}</code>{warn}</figcaption></figure>"
                )
            p.append("</div>")
        if run.screenshot_error:
            p.append(f"<p class='bad'>viewer screenshots failed: {_e(run.screenshot_error)}</p>")
        if run.previews:
            p.append("<h3>Previews</h3><div>")
            for title, png in run.previews:
                b64 = base64.b64encode(png).decode("ascii")
                p.append(
                    f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{b64}">'
                    f"<figcaption>{_e(title)}</figcaption></figure>"
                )
            p.append("</div>")
        if run.preview_error:
            p.append(f"<p class='muted'>no {'output ' if run.previews else ''}preview: {_e(run.preview_error)}</p>")
        p.append("<table>")
        rows: list[tuple[str, str]] = [
            ("SeriesInstanceUID", f"<code>{_e(run.series_uid)}</code>"),
            ("Instances sent / accepted", f"{len(run.files)} / {run.accepted}"),
            ("Send (one association)", secs(run.send_seconds)),
            ("Series complete after last instance", secs(run.completion_seconds)),
            ("Job run", secs(run.job_seconds)),
            ("First instance sent &rarr; last result received", secs(run.end_to_end_seconds)),
        ]
        for job in run.jobs:
            err = f"; error: {_e(job.error)}" if job.error else ""
            rows.append(
                (
                    f"Job {job.id}",
                    f"{_e(job.pipeline)}: {_e(job.state)}, {job.attempts} attempt(s), {job.outputs} output(s){err}",
                )
            )
        rows.append(("Input files", _paths_cell(sorted({f.parent for f in run.files}))))
        if run.study_uid:
            try:
                stored = data_dir.resolve() / "store" / checked_uid(run.study_uid) / checked_uid(run.series_uid)
                rows.append(("Stored by the gateway", _paths_cell([stored])))
            except InvalidUID:
                pass
        for job in run.jobs:
            rows.append((f"Job {job.id} work folder", _paths_cell([data_dir.resolve() / "jobs" / f"{job.id:08d}"])))
        rows.append(("Received by " + PACS_AE, _paths_cell(run.output_dirs) if run.output_dirs else "-"))
        p.extend(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        p.append("</table></section>")

    p.append("<section><h2>Where things are</h2><table>")
    for label, path in (
        ("Demo folder", out),
        ("Synthetic input studies", out / "input"),
        ("Gateway data dir (store, jobs, index)", data_dir),
        (f"Results received by {PACS_AE}", out / "received"),
        ("Gateway log", out / "gateway.log"),
    ):
        p.append(f"<tr><th>{_e(label)}</th><td>{_paths_cell([path])}</td></tr>")
    p.append("</table>")
    p.append(
        "<p>Look at the jobs with <code>aigw jobs list --data-dir "
        f"{_e(Path(data_dir).resolve())}</code>.</p></section></body></html>"
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_name(f".{report.name}.part")
    tmp.write_text("\n".join(p), encoding="utf-8")
    os.replace(tmp, report)


def _paths_cell(paths: Sequence[Path]) -> str:
    return "<br>".join(f"<code>{_e(Path(x).resolve())}</code>" for x in paths) or "-"
