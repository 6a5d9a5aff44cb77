"""Knowing when a series is complete, then routing it.

DICOM has no "end of series" message, so completion is inferred:

* a quiet period per series (from its routes, default 10 s), re-armed by each
  new instance; deadlines live in the index, so a restart resumes them;
* count hints bring the deadline forward (to ``hint_quiet_seconds``):
  ImagesInAcquisition, an enhanced multi-frame instance, a whole slide pyramid;
* the release of the association that delivered the series also brings it
  forward (``release_quiet_seconds``).

When a deadline passes, the :class:`Completer` routes the series and queues one
job per matching route in the same transaction that marks it complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway._loop import PeriodicLoop
from gateway.config import CompletionSettings, UnroutedPolicy
from gateway.index import Index
from gateway.metrics import Metrics
from gateway.routing import Router
from gateway.uids import short_ref

__all__ = ["Completer", "count_hint", "is_slide", "slide_pyramid_complete"]

log = logging.getLogger(__name__)

WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
# Enhanced multi-frame classes whose one instance usually carries the series.
_ENHANCED = {
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
}


def is_slide(sop_class_uid: str) -> bool:
    return sop_class_uid == WSI_STORAGE


def _int(v: Any) -> int | None:
    try:
        n = int(v)
        return n if n > 0 else None
    except (TypeError, ValueError):
        return None


def count_hint(headers: Mapping[str, Any], sop_class_uid: str) -> int | None:
    """Number of instances the series is expected to have, if the headers say."""
    n = _int(headers.get("ImagesInAcquisition"))
    if n is not None:
        return n
    if sop_class_uid in _ENHANCED and (_int(headers.get("NumberOfFrames")) or 0) > 1:
        return 1
    return None


def _image_type(h: Mapping[str, Any]) -> list[str]:
    v = h.get("ImageType") or []
    return [str(x).upper() for x in (v if isinstance(v, list) else [v])]


def slide_pyramid_complete(headers: Sequence[Mapping[str, Any]]) -> bool:
    """A slide is whole when its base level, a single-tile top level and all
    parts of every concatenation have arrived (PS3.3 C.8.12.4, C.7.6.16.2.2)."""
    volume = [h for h in headers if "VOLUME" in _image_type(h)]
    if not volume:
        return False
    base = any("ORIGINAL" in _image_type(h) for h in volume)
    top = any(
        (_int(h.get("TotalPixelMatrixColumns")) or 1 << 30) <= (_int(h.get("Columns")) or 0)
        and (_int(h.get("TotalPixelMatrixRows")) or 1 << 30) <= (_int(h.get("Rows")) or 0)
        for h in volume
    )
    concat: dict[str, tuple[int, int]] = {}
    for h in headers:
        uid = h.get("ConcatenationUID")
        total = _int(h.get("InConcatenationTotalNumber"))
        if uid and total:
            seen, _ = concat.get(str(uid), (0, total))
            concat[str(uid)] = (seen + 1, total)
    return base and top and all(seen >= total for seen, total in concat.values())


class Completer(PeriodicLoop):
    """Background loop: completes due series and queues their jobs."""

    name = "aigw-completion"

    def __init__(
        self,
        index: Index,
        router: Router,
        settings: CompletionSettings,
        metrics: Metrics,
        destinations: Sequence[str],
    ) -> None:
        self.index = index
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self.destinations = list(destinations)
        super().__init__(settings.poll_seconds)

    def run_once(self, now: float | None = None) -> int:
        """Complete and route every series whose deadline has passed."""
        now = time.time() if now is None else now
        done = 0
        for row in self.index.due_series(now):
            series = self.index.assemble(row.series_uid)
            if series is None:
                continue
            try:
                routes = self.router.matches(series)
            except Exception:
                log.exception("routing of series %s failed; it stays unrouted", short_ref(row.series_uid))
                routes = []
            cause = row.completed_by or "timer"
            job_ids = self.index.mark_routed(
                row.series_uid, row.version, routes, now=now, completed_by=cause
            )
            if job_ids is None:
                continue  # someone else completed it, or a newer version is arriving
            if not routes:
                self.metrics.series_unrouted.inc()
                log.info("series %s complete: no route matched", short_ref(row.series_uid))
                if self.settings.unrouted == UnroutedPolicy.FORWARD and self.destinations:
                    items = [(i.sop_instance_uid, i.sop_class_uid, i.path) for i in series.instances]
                    self.index.queue_forward(items, self.destinations, now)
            else:
                log.info(
                    "series %s v%d complete (%s, %d instances): jobs %s",
                    short_ref(row.series_uid),
                    row.version,
                    cause,
                    series.instance_count,
                    ",".join(f"{j}:{p}" for j, (_, p) in zip(job_ids, routes)),
                )
            self.metrics.series_completed.labels(cause=cause).inc()
            done += 1
        return done


