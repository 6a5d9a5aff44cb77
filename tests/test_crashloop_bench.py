"""The kill -9 crash-loop bench (ops/bench/crashloop.py): its verdicts, and a tiny run against real peers.

The verdict logic is what turns a run into "target met": it is tested here on
hand-made result versions, including the cases the gateway must never
produce (two results that do not supersede each other), so that a bench that
cannot see the bug cannot pass these tests.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "ops" / "bench" / "crashloop.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aigw_bench_crashloop", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cl = _load()


def _version(
    version: int, *series: str, in_pacs: int = 2, supersedes: int | None = None, related: Iterable[str] = ()
) -> Any:
    """A job's result of ``version`` with 2 instances in each of ``series``, ``in_pacs`` of them in PACS."""
    rv = cl.ResultVersion(version, version, "sent", None, {s: 2 for s in series}, 0)
    rv.in_pacs = {s: in_pacs for s in series}
    rv.supersedes = set() if supersedes is None else {supersedes}
    rv.related = set(related)
    return rv


def test_one_result_is_current() -> None:
    assert cl.judge([_version(1, "1.1")], final_version=1) == ([1], cl.Outcome.ONE)


def test_a_rerun_that_names_and_references_the_earlier_result_supersedes_it() -> None:
    versions = [_version(1, "1.1", "1.2"), _version(2, "2.1", "2.2", supersedes=1, related={"1.1", "1.2"})]
    assert cl.judge(versions, final_version=2) == ([2], cl.Outcome.SUPERSEDED)


def test_a_chain_of_reruns_leaves_the_last_one_current() -> None:
    versions = [
        _version(1, "1.1"),
        _version(2, "2.1", supersedes=1, related={"1.1"}),
        _version(3, "3.1", supersedes=2, related={"2.1"}),
    ]
    assert cl.judge(versions, final_version=3) == ([3], cl.Outcome.SUPERSEDED)


@pytest.mark.parametrize(
    "second",
    [
        _version(2, "2.1"),  # no mark at all: the bug of issue 16 item 14
        _version(2, "2.1", supersedes=1),  # says so, but references nothing
        _version(2, "2.1", supersedes=1, related={"1.9"}),  # references another series
        _version(2, "2.1", supersedes=3, related={"1.1"}),  # names the wrong version
    ],
)
def test_two_results_that_do_not_supersede_each_other_are_ambiguous(second: object) -> None:
    assert cl.judge([_version(1, "1.1"), second], final_version=2) == ([1, 2], cl.Outcome.AMBIGUOUS)


def test_a_rerun_that_skips_a_result_in_pacs_leaves_two_current() -> None:
    versions = [_version(1, "1.1"), _version(2, "2.1"), _version(3, "3.1", supersedes=1, related={"1.1"})]
    assert cl.judge(versions, final_version=3) == ([2, 3], cl.Outcome.AMBIGUOUS)


def test_other_endings_that_miss_the_target() -> None:
    assert cl.judge([_version(1, "1.1", in_pacs=0)], final_version=1) == ([], cl.Outcome.NO_RESULT)
    assert cl.judge([_version(1, "1.1", in_pacs=1)], final_version=1)[1] == cl.Outcome.INCOMPLETE
    # The only result in PACS is of an earlier version than the series reached: it misses instances.
    assert cl.judge([_version(1, "1.1"), _version(2, "2.1", in_pacs=0)], final_version=2) == ([1], cl.Outcome.STALE)
    assert all(o in cl.VIOLATIONS for o in (cl.Outcome.AMBIGUOUS, cl.Outcome.NO_RESULT, cl.Outcome.STALE))


def test_marks_are_read_from_every_instance_and_must_agree() -> None:
    marked = {"SeriesDescription": "IVIM D (supersedes v1)", "RelatedSeriesSequence": [{"SeriesInstanceUID": "1.1"}]}
    agreeing = _version(2, "2.1")
    cl.read_marks(agreeing, {"2.1": [marked, marked]})
    assert agreeing.supersedes == {1} and agreeing.related == {"1.1"} and agreeing.complete
    mixed = _version(2, "2.1")
    cl.read_marks(mixed, {"2.1": [marked, {"SeriesDescription": "IVIM D"}]})
    assert mixed.marks_inconsistent and not mixed.supersedes
    assert cl.judge([_version(1, "1.1"), mixed], final_version=2)[1] == cl.Outcome.AMBIGUOUS


def test_only_answered_instances_count_as_acknowledged() -> None:
    log = "\n".join(
        [
            "I: Requesting Association",
            "I: Sending file: /s/a.dcm",
            "I: Sending Store Request (MsgID 1, MR)",
            "I: Received Store Response (Success)",
            "I: Sending file: /s/b.dcm",
            "I: Received Store Response (Warning: Coercion of Data Elements)",
            "I: Sending file: /s/c.dcm",
            "I: Received Store Response (Error: Out of Resources)",
            "I: Sending file: /s/d.dcm",
            "E: Store Failed, file: /s/d.dcm:",  # the association died before the answer
        ]
    )
    uids = {"/s/a.dcm": "1.1", "/s/b.dcm": "1.2", "/s/c.dcm": "1.3", "/s/d.dcm": "1.4"}
    assert cl.acknowledged(log, uids) == ["1.1", "1.2"]


@pytest.mark.peers
@pytest.mark.slow
def test_a_tiny_crash_loop_meets_the_target(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(SCRIPT), "--pipeline", "test-invert", "--series", "3", "--kills", "2",
        "--duration", "6", "--directions", "1", "--seed", "7", "--tmp", str(tmp_path),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "lost: 0 (target 0)" in text and ": MET" in text
    kills = re.search(r"kills: (\d+)", text)
    assert kills is not None and int(kills.group(1)) >= 1, "the loop never killed the gateway"
