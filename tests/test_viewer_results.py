"""Every result type, as a radiologist sees it: OHIF over Orthanc's DICOMweb in headless Chromium.

The pipelines run on small synthetic studies; inputs and outputs go into the
viewer's Orthanc, and each result series is opened in OHIF (or, for the types
OHIF 3.13 cannot show, in the harness's fallback, see :mod:`gateway.apps.viewer`).
The assertions are on the rendered pixels of the screenshots: not blank, not
saturated, a spread of grey levels; the segmentation's overlay where the
tumour is; the report's probability readable by OCR from the picture.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread

from gateway.apps.viewer import Screenshot, Viewer, ViewerMode
from pipelines._lab import cpu_session
from pipelines.ivim.lab.synthetic import make_dwi_study
from pipelines.ivim.pipeline import IvimPipeline
from pipelines.lf2hf.lab.synthetic import write_lowfield_series
from pipelines.lf2hf.pipeline import Lf2hfPipeline
from pipelines.wsimil.infer import ENCODER, HEAD
from pipelines.wsimil.lab.scene import SlideScene
from pipelines.wsimil.lab.wsi import SlideFiles
from pipelines.wsimil.pipeline import WsiMilPipeline
from tests.conftest import REPO, need, save_all
from tests.test_ivim_pipeline import as_series
from tests.test_ivim_pipeline import context as ivim_context
from tests.test_lf2hf_pipeline import context as lf2hf_context
from tests.test_wsimil_pipeline import context as wsi_context
from tests.test_wsimil_pipeline import slide

pytestmark = [pytest.mark.peers, pytest.mark.slow]

PM_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Shown:
    """One result series and its screenshot."""

    head: Dataset
    shot: Screenshot


def _show(viewer: Viewer, outputs: list[Path], folder: Path) -> dict[str, Shown]:
    """Screenshot every series among ``outputs``, keyed by Series Description."""
    heads: dict[str, Dataset] = {}
    for path in outputs:
        head = dcmread(path, stop_before_pixels=True)
        heads.setdefault(str(head.SeriesInstanceUID), head)
    shown = {}
    for k, first in enumerate(heads.values()):
        png = folder / f"{k:02d}-{first.Modality}.png"
        shown[str(first.SeriesDescription)] = Shown(
            first, viewer.screenshot_series(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), png)
        )
    return shown


@pytest.fixture(scope="module")
def ivim_shown(viewer: Viewer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Shown]:
    root = tmp_path_factory.mktemp("ivim-shown")
    study = make_dwi_study(root / "in", seed=21, size=64, slices=3)
    outputs = save_all(IvimPipeline().run(as_series(study.paths), ivim_context()), root / "out")
    viewer.upload([*study.paths, *outputs])
    return _show(viewer, outputs, root / "shots")


@pytest.fixture(scope="module")
def wsi_shown(
    viewer: Viewer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SlideScene, SlideFiles, dict[str, Shown], Screenshot]:
    root = tmp_path_factory.mktemp("wsi-shown")
    sessions = {name: cpu_session(REPO / "exported_models" / f"{name}.onnx", threads=None) for name in (ENCODER, HEAD)}
    scene, files = slide(root / "in", seed=7)
    ctx, _ = wsi_context(sessions)
    outputs = save_all(WsiMilPipeline().run(as_series(files.paths), ctx), root / "out")
    viewer.upload([*files.paths, *outputs])
    source = viewer.screenshot_series(files.study_uid, files.series_uid, root / "shots" / "slide.png")
    return scene, files, _show(viewer, outputs, root / "shots"), source


def _by_kind(shown: dict[str, Shown], sop_class: str) -> dict[str, Shown]:
    return {d: s for d, s in shown.items() if s.head.SOPClassUID == sop_class}


def test_each_ivim_parametric_map_shows_its_parameter_with_structure(ivim_shown: dict[str, Shown]) -> None:
    maps = _by_kind(ivim_shown, PM_STORAGE)
    assert sorted(d.split()[1] for d in maps) == ["D", "DSTAR", "DSTAR_SD", "D_SD", "F", "F_SD", "S0"]
    for description, s in maps.items():
        # Each parameter frame: a spread of grey levels through its own window.
        assert not s.shot.stats.problems(), (description, s.shot.stats, s.shot.notes)
        assert s.shot.stats.grey_levels >= 32, (description, s.shot.stats)


def test_each_derived_ivim_series_renders_in_ohif(ivim_shown: dict[str, Shown]) -> None:
    derived = {d: s for d, s in ivim_shown.items() if s.head.SOPClassUID != PM_STORAGE}
    assert sorted(d.split()[1] for d in derived) == ["D", "DSTAR", "DSTAR_SD", "D_SD", "F", "F_SD", "S0"]
    for description, s in derived.items():
        assert s.shot.mode is ViewerMode.VIEWER, (description, s.shot.notes)
        assert not s.shot.stats.problems(), (description, s.shot.stats)


def test_the_ai_enhanced_low_field_series_renders_in_ohif(viewer: Viewer, tmp_path: Path) -> None:
    inputs = write_lowfield_series(tmp_path / "in", seed=12, matrix=(96, 88), slices=(75, 85))
    ctx, _ = lf2hf_context()
    outputs = save_all(Lf2hfPipeline().run(as_series(inputs), ctx), tmp_path / "out")
    viewer.upload([*inputs, *outputs])
    (s,) = _show(viewer, outputs, tmp_path / "shots").values()
    assert s.shot.mode is ViewerMode.VIEWER, s.shot.notes
    assert not s.shot.stats.problems(), s.shot.stats


def test_the_slide_renders_in_ohif_microscopy(
    wsi_shown: tuple[SlideScene, SlideFiles, dict[str, Shown], Screenshot],
) -> None:
    source = wsi_shown[3]
    assert source.mode is ViewerMode.MICROSCOPY, source.notes
    # Bright-field: mostly white glass, but the tissue must be there.
    assert not source.stats.problems(max_white=0.98, max_uniform=0.98), source.stats


def test_the_segmentation_overlay_lies_over_the_tumour(
    wsi_shown: tuple[SlideScene, SlideFiles, dict[str, Shown], Screenshot],
) -> None:
    scene, files, shown, _ = wsi_shown
    (s,) = _by_kind(shown, SEG_STORAGE).values()
    rgb = np.asarray(Image.open(s.shot.viewport_png).convert("RGB"), dtype=np.int32)
    # The picture is one pyramid level (enlarged by a whole factor if small): find which.
    level = next(lv for lv in files.levels if rgb.shape[1] % lv.columns == 0 and rgb.shape[1] // lv.columns <= 4)
    scale = rgb.shape[1] // level.columns
    truth = scene.tumour_mask(0, 0, level.columns, level.rows, level.mpp)
    truth = np.kron(truth, np.ones((scale, scale), bool))[: rgb.shape[0], : rgb.shape[1]]
    red = (rgb[..., 0] > 170) & (rgb[..., 1] < 90) & (rgb[..., 2] < 110)
    assert truth.any()
    inside, outside = red[truth].mean(), red[~truth].mean()
    assert inside > 0.3 and inside > 10 * outside, (inside, outside)


def test_the_report_shows_the_probability(
    wsi_shown: tuple[SlideScene, SlideFiles, dict[str, Shown], Screenshot], tmp_path: Path
) -> None:
    _, _, shown, _ = wsi_shown
    (s,) = (v for v in shown.values() if v.head.Modality == "SR")
    # Read the picture as a person would: OCR of the rendered pixels, not the DICOM text.
    r = subprocess.run(
        [need("tesseract"), str(s.shot.viewport_png), "stdout", "--psm", "6"], capture_output=True, text=True
    )
    found = re.search(r"Probability of cancer:\s*([01](?:\.\d+)?)", r.stdout)
    assert found, r.stdout
    assert float(found.group(1)) == pytest.approx(_probability(s.head), abs=1e-4)
    assert "Present" in r.stdout


def _probability(ds: Dataset) -> float:
    """The report's Probability of cancer (DCM 111047), wherever it sits in the content tree."""
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == "111047":
            return float(item.MeasuredValueSequence[0].NumericValue)
        try:
            return _probability(item)
        except LookupError:
            continue
    raise LookupError("no Probability of cancer in the report")
