"""``aigw demo`` end to end, in-process: gateway, DEMO_PACS and the report.

The demo runs with the test plugin only (installed entry points are hidden),
so these tests do not depend on which pipeline packages are installed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from gateway.apps.demo import MARKER, run_demo
from gateway.apps.viewer import image_stats
from gateway.contract import ModelSpec, RunContext, Selection, Series, SeriesInfo


class FailingPipeline:
    """A pipeline whose every run fails (a transient error, so it is retried first)."""

    name = "test-failing"

    def selects(self, series: SeriesInfo) -> Selection:
        return Selection(True, "every series")

    def models(self) -> Sequence[ModelSpec]:
        return []

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        raise RuntimeError("simulated pipeline failure")

    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from pydicom.data import get_testdata_file

        ds = dcmread(str(get_testdata_file("MR_small.dcm")))
        folder.mkdir(parents=True, exist_ok=True)
        ds.SeriesInstanceUID = f"2.25.{seed}3"
        ds.SOPInstanceUID = f"2.25.{seed}4"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / "mr.dcm"
        ds.save_as(path, enforce_file_format=True)
        return [path]


def failing() -> FailingPipeline:
    return FailingPipeline()


@pytest.fixture(autouse=True)
def _only_configured_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    # Installed pipeline packages would add their own demo series.
    monkeypatch.setattr("gateway.plugins.entry_points", lambda group: [])


def _config(tmp_path: Path, plugin: str, models_dir: Path | None = None) -> Path:
    path = tmp_path / "demo.toml"
    text = f"plugins = [{json.dumps(plugin)}]\n"
    if models_dir is not None:
        text += f"\n[models]\ndir = {json.dumps(str(models_dir))}\n"
    path.write_text(text)
    return path


def test_demo_sends_series_and_reports_results(tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "demo"
    report = tmp_path / "report.html"
    cfg = _config(tmp_path, "tests.plugins.invert:InvertPipeline", models_dir)

    t0 = time.monotonic()
    assert run_demo(out, report, timeout=60, config_path=cfg) == 0
    assert time.monotonic() - t0 < 60

    html = report.read_text()
    assert "data:image/png;base64," in html
    assert html.count("<img ") >= 2  # input and output side by side
    assert "test-invert" in html
    assert "demo OK" in html
    assert str(out / "received") in html
    # The PACS is a real Orthanc, and OHIF showed the input and the result.
    assert "In the viewer (OHIF over Orthanc" in html and "looks wrong" not in html
    shots = sorted((out / "screenshots").glob("*.viewport.png"))
    assert [p.name for p in shots] == ["01-test-invert-input.viewport.png", "01-test-invert-result1.viewport.png"]
    for shot in shots:
        assert not image_stats(shot).problems(), shot.name
        assert shot.name in html

    received = sorted((out / "received").rglob("*.dcm"))
    assert received, "DEMO_PACS received nothing"
    for path in received:
        ds = dcmread(path)
        assert ds.ImageType[0] == "DERIVED"
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.stem == ds.SOPInstanceUID
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    assert (out / MARKER).is_file()
    assert (out / "gateway.log").stat().st_size > 0

    # A second run into the same folder replaces the first one's contents.
    (out / "received" / "stale.txt").write_text("from the previous run")
    assert run_demo(out, report, timeout=60, config_path=cfg) == 0
    assert not (out / "received" / "stale.txt").exists()


def test_demo_fails_when_the_pipeline_fails(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    report = tmp_path / "report.html"
    cfg = _config(tmp_path, "tests.test_demo:failing")

    t0 = time.monotonic()
    rc = run_demo(out, report, timeout=15, config_path=cfg)
    assert rc != 0
    assert time.monotonic() - t0 < 45
    html = report.read_text()
    assert "demo FAILED" in html
    assert "simulated pipeline failure" in html
    assert not list((out / "received").rglob("*.dcm"))


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("not the demo's")
    assert run_demo(out, tmp_path / "report.html", timeout=5) == 2
    assert (out / "keep.txt").read_text() == "not the demo's"
    assert "refusing" in capsys.readouterr().err


def test_demo_without_pipelines_explains_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "tests.no_such_module:factory")
    assert run_demo(tmp_path / "demo", tmp_path / "report.html", timeout=5, config_path=cfg) == 1
    err = capsys.readouterr().err
    assert "no available pipeline provides demo data" in err
    assert "missing dependency" in err
