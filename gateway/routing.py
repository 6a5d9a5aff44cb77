"""Routing: which complete series go to which pipeline, and why.

Semantics:

* every route that matches a series makes one job, so a series may go to
  several pipelines;
* a route's conditions combine with its pipeline's default selector by the
  route's ``selector`` mode (narrow: both; widen: either; replace: conditions
  only);
* with no ``[[routes]]`` configured, every available pipeline gets an implicit
  route named after it that uses its default selector alone;
* a series that matches nothing is unrouted: counted, and kept or forwarded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Condition, Route, SelectorMode
from gateway.contract import Instance, Pipeline, Selection, SeriesInfo

__all__ = ["RouteDecision", "Router", "evaluate_condition"]

log = logging.getLogger(__name__)

_NO_PATH = Path()


@dataclass(frozen=True)
class RouteDecision:
    """The outcome of one route for one series, with the reasons."""

    route: str
    pipeline: str
    matched: bool
    reasons: tuple[str, ...]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, frozenset, set)) else [value]


def _number(value: Any) -> float | None:
    for v in _as_list(value):
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(b, (int, float)):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return str(a).strip() == str(b).strip()


def evaluate_condition(cond: Condition, series: SeriesInfo) -> Selection:
    """Evaluate one condition; the reason shows the value that decided it."""
    desc = cond.describe()
    if cond.aggregate is not None:
        n = series.instance_count if cond.aggregate == "instances" else len(series.values(cond.keyword or ""))
        if cond.equals is not None:
            ok = _equal(n, cond.equals)
        else:
            lo, hi = cond.range or (None, None)
            ok = (lo is None or n >= lo) and (hi is None or n <= hi)
        return Selection(ok, f"{desc}: value {n}")

    kw = cond.keyword or ""
    if kw == "CallingAETitle":
        value: Any = series.calling_ae
    else:
        value = series.first(kw)
    shown = _shown(kw, value)
    if cond.exists is not None:
        present = value is not None and value != ""
        return Selection(present == cond.exists, f"{desc}: {'present' if present else 'absent'}")
    if value is None:
        return Selection(False, f"{desc}: {kw} absent")
    values = _as_list(value)
    if cond.equals is not None:
        ok = any(_equal(v, cond.equals) for v in values)
    elif cond.one_of is not None:
        ok = any(_equal(v, o) for v in values for o in cond.one_of)
    elif cond.regex is not None:
        text = "\\".join(str(v) for v in values)
        ok = re.search(cond.regex, text) is not None
    else:
        lo, hi = cond.range or (None, None)
        num = _number(value)
        ok = num is not None and (lo is None or num >= lo) and (hi is None or num <= hi)
    return Selection(ok, f"{desc}: value {shown}")


def _shown(keyword: str, value: Any) -> str:
    # Routing keys come from headers that never include identifying attributes
    # (gateway.headers.EXCLUDED_KEYWORDS), so values are safe to show.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Router:
    """Evaluates the configured routes against series."""

    def __init__(
        self,
        routes: Sequence[Route],
        pipelines: Mapping[str, Pipeline],
        unavailable: Mapping[str, str] | None = None,
        default_quiet_seconds: float = 10.0,
    ) -> None:
        self.pipelines = dict(pipelines)
        self.unavailable = dict(unavailable or {})
        self.default_quiet_seconds = default_quiet_seconds
        if routes:
            self.routes = list(routes)
            self.implicit = False
        else:
            self.routes = [Route(name=name, pipeline=name) for name in sorted(self.pipelines)]
            self.implicit = True

    def check(self) -> list[str]:
        """Configuration problems: routes that name pipelines that do not exist."""
        problems = []
        known = set(self.pipelines) | set(self.unavailable)
        for i, r in enumerate(self.routes):
            if r.pipeline not in known:
                problems.append(
                    f"routes[{i}].pipeline: unknown pipeline {r.pipeline!r}"
                    f" (installed: {', '.join(sorted(known)) or 'none'})"
                )
        return problems

    def decide(self, route: Route, series: SeriesInfo) -> RouteDecision:
        reasons: list[str] = []
        pipeline = self.pipelines.get(route.pipeline)
        if pipeline is None:
            why = self.unavailable.get(route.pipeline, "not installed")
            return RouteDecision(route.name, route.pipeline, False, (f"pipeline unavailable: {why}",))
        if route.calling_ae and series.calling_ae not in route.calling_ae:
            return RouteDecision(
                route.name,
                route.pipeline,
                False,
                (f"calling AE {series.calling_ae!r} not in {route.calling_ae}",),
            )
        cond_results = [evaluate_condition(c, series) for c in route.conditions]
        cond_ok = all(r.matched for r in cond_results)
        for r in cond_results:
            reasons.append(f"{'ok  ' if r.matched else 'FAIL'} {r.reason}")
        if route.selector == SelectorMode.REPLACE:
            matched = cond_ok
        else:
            try:
                sel = pipeline.selects(series)
            except Exception as exc:  # a plugin bug must not stop routing of other routes
                log.exception("selector of pipeline %s raised", route.pipeline)
                sel = Selection(False, f"selector raised {type(exc).__name__}")
            reasons.insert(0, f"{'ok  ' if sel.matched else 'FAIL'} default selector: {sel.reason}")
            if route.selector == SelectorMode.NARROW:
                matched = sel.matched and cond_ok
            else:  # WIDEN: conditions alone can bring a series in
                matched = sel.matched or (bool(route.conditions) and cond_ok)
        return RouteDecision(route.name, route.pipeline, matched, tuple(reasons))

    def evaluate(self, series: SeriesInfo) -> list[RouteDecision]:
        return [self.decide(r, series) for r in self.routes]

    def matches(self, series: SeriesInfo) -> list[tuple[str, str]]:
        return [(d.route, d.pipeline) for d in self.evaluate(series) if d.matched]

    def quiet_seconds(self, headers: Mapping[str, Any], calling_ae: str) -> float:
        """Quiet period for a new series, from the routes its first instance may match.

        Only header conditions of routes that set ``quiet_period_seconds`` are
        tested (aggregates need the whole series); the longest period wins.
        """
        periods = [r for r in self.routes if r.quiet_period_seconds is not None]
        if not periods:
            return self.default_quiet_seconds
        info = SeriesInfo(
            series_uid="",
            study_uid="",
            modality=str(headers.get("Modality", "")),
            calling_ae=calling_ae,
            instances=[Instance("", str(headers.get("SOPClassUID", "")), _NO_PATH, headers)],
        )
        best: float | None = None
        for r in periods:
            if r.calling_ae and calling_ae not in r.calling_ae:
                continue
            if all(evaluate_condition(c, info).matched for c in r.conditions if c.aggregate is None):
                best = max(best or 0.0, float(r.quiet_period_seconds or 0))
        return best if best is not None else self.default_quiet_seconds

