"""The demo's series, from generation to results: what happened to each, with its timings.

:class:`SeriesRun` is the record the report is written from;
:func:`wait_for_results` brings every run up to date from the gateway's index
and ``DEMO_PACS`` until each is back, failed or out of time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from gateway.apps.demo._console import PROGRESS_EVERY, Console
from gateway.apps.demo.pacs import PACS_AE, Pacs, Received
from gateway.index import JobState, SendState, SeriesState
from gateway.uids import checked_uid, short_ref

if TYPE_CHECKING:
    from gateway.service import Gateway

__all__ = ["JobOutcome", "PipelineNote", "SeriesRun", "ViewerShot", "series_of", "wait_for_results"]


@dataclass
class JobOutcome:
    """What the index says about one job of a demo series."""

    id: int
    pipeline: str
    state: str
    attempts: int
    outputs: int
    error: str | None
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class ViewerShot:
    """One series as OHIF showed it: the viewport crop and what is wrong with it, if anything."""

    title: str
    path: Path  # the viewport crop; the whole page lies next to it
    series_uid: str
    url: str
    problems: tuple[str, ...]
    seconds: float


@dataclass
class SeriesRun:
    """One demo series, from generation to results, with its timings."""

    pipeline: str
    series_uid: str
    files: list[Path]
    sop_class_uids: list[str] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    accepted: int = 0
    send_error: str | None = None
    send_started: float | None = None
    send_finished: float | None = None
    completed_at: float | None = None
    study_uid: str | None = None
    jobs: list[JobOutcome] = field(default_factory=list)
    outputs: list[Received] = field(default_factory=list)
    output_dirs: list[Path] = field(default_factory=list)
    status: str = "waiting"  # back, failed, timed out
    error: str | None = None
    previews: list[tuple[str, bytes]] = field(default_factory=list)
    preview_error: str | None = None
    screenshots: list[ViewerShot] = field(default_factory=list)
    screenshot_error: str | None = None

    @property
    def done(self) -> bool:
        return self.status != "waiting"

    @property
    def ok(self) -> bool:
        return self.status == "back"

    @property
    def ref(self) -> str:
        return short_ref(self.series_uid)

    # Timings, None where the stage did not happen.
    @property
    def send_seconds(self) -> float | None:
        return _diff(self.send_started, self.send_finished)

    @property
    def completion_seconds(self) -> float | None:
        return _diff(self.send_finished, self.completed_at)

    @property
    def job_seconds(self) -> float | None:
        starts = [j.started_at for j in self.jobs if j.started_at]
        ends = [j.finished_at for j in self.jobs if j.finished_at]
        return _diff(min(starts), max(ends)) if starts and ends else None

    @property
    def end_to_end_seconds(self) -> float | None:
        last = max((r.at for r in self.outputs), default=None)
        return _diff(self.send_started, last)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(0.0, b - a)


@dataclass
class PipelineNote:
    """A pipeline that did not send a demo study, and why."""

    name: str
    reason: str


def series_of(pipeline: str, files: Sequence[Path]) -> list[SeriesRun]:
    """Group a demo study's files by series, in the order the pipeline gave them."""
    runs: dict[str, SeriesRun] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        uid = checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        run = runs.setdefault(uid, SeriesRun(pipeline, uid, []))
        run.files.append(Path(f))
        run.sop_class_uids.append(str(ds.SOPClassUID))
        run.transfer_syntaxes.append(str(ds.file_meta.TransferSyntaxUID))
    return list(runs.values())


def _update(run: SeriesRun, gw: Gateway, pacs: Pacs, jobs_by_series: Mapping[str, list[Any]]) -> None:
    """Bring ``run`` up to date from the index and DEMO_PACS; sets its status once final."""
    if run.done:
        return
    if run.accepted == 0:
        run.status, run.error = "failed", run.send_error or "no instance was accepted by the gateway"
        return
    row = gw.index.get_series(run.series_uid)
    if row is None:
        return
    run.study_uid = row.study_uid
    run.completed_at = row.completed_at
    if row.state == SeriesState.UNROUTED.value:
        run.status = "failed"
        run.error = "the series completed but no route matched it (see 'aigw route explain' and [[routes]])"
        return
    if row.state != SeriesState.ROUTED.value:
        return
    jobs = [j for j in jobs_by_series.get(run.series_uid, []) if j.series_version == row.version]
    run.jobs = [
        JobOutcome(j.id, j.pipeline, j.state, j.attempts, j.outputs, j.error, j.started_at, j.finished_at)
        for j in sorted(jobs, key=lambda j: j.id)
    ]
    if not jobs:
        return
    outputs: list[Received] = []
    missing = 0
    for job in jobs:
        if job.state == JobState.FAILED.value:
            run.status = "failed"
            run.error = f"job {job.id} ({job.pipeline}) failed: {job.error or 'no reason recorded'}"
            return
        if job.state not in (JobState.SUCCEEDED.value, JobState.SENT.value):
            return
        for send in gw.index.sends_for_job(job.id):
            if send.state == SendState.DEAD.value:
                run.status = "failed"
                run.error = f"job {job.id}: a result could not be delivered to {PACS_AE}: {send.error}"
                return
            got = pacs.get(send.sop_instance_uid)
            if got is None:
                missing += 1
            else:
                outputs.append(got)
    if missing or any(j.state != JobState.SENT.value for j in jobs):
        return
    run.outputs = sorted(outputs, key=lambda r: (r.series_uid, r.path.name))
    run.output_dirs = sorted({r.path.parent for r in run.outputs})
    if not run.outputs:
        run.status, run.error = "failed", "the pipeline returned no output instances"
    elif run.accepted < len(run.files):
        # Results for part of a series are not the series coming back.
        run.status = "failed"
        run.error = f"only {run.accepted} of {len(run.files)} instances reached the gateway: {run.send_error}"
    else:
        run.status = "back"


def wait_for_results(runs: list[SeriesRun], gw: Gateway, pacs: Pacs, timeout: float, console: Console) -> None:
    """Poll until every series is back or failed, or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        by_series: dict[str, list[Any]] = defaultdict(list)
        for j in gw.index.list_jobs(limit=100_000):
            by_series[j.series_uid].append(j)
        for run in runs:
            _update(run, gw, pacs, by_series)
        if all(r.done for r in runs):
            return
        now = time.monotonic()
        if now >= deadline:
            for run in runs:
                if not run.done:
                    run.status = "timed out"
                    run.error = f"no complete results after {timeout:.0f} s ({_stage(run)})"
            return
        if now - last >= PROGRESS_EVERY:
            last = now
            back = sum(r.ok for r in runs)
            failed = sum(r.done and not r.ok for r in runs)
            states: dict[str, int] = defaultdict(int)
            for r in runs:
                if not r.done:
                    states[_stage(r)] += 1
            pending = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
            console.say(
                f"waiting for results: {back}/{len(runs)} series back, {failed} failed"
                f"{'; ' + pending if pending else ''}; {pacs.count()} result instance(s) at {PACS_AE}"
                f" ({deadline - now:.0f} s left)"
            )
        time.sleep(0.2)


def _stage(run: SeriesRun) -> str:
    """Where a series that is not back yet stands, in words."""
    if run.completed_at is None:
        return "waiting for series completion"
    if not run.jobs:
        return "completed, no job yet"
    for j in run.jobs:
        if j.state == JobState.QUEUED.value and j.error:
            return f"job retrying after: {j.error[:80]}"
    states = sorted({j.state for j in run.jobs})
    if states == [JobState.SUCCEEDED.value]:
        return "results being sent"
    return "job " + "/".join(states)
