"""The wsi-mil pipeline: selection, options, SEG and SR validity and geometry, pyramid variants, bad input, e2e."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import dcmread

from gateway.contract import Identity, InputError, Instance, RunContext, Series
from gateway.headers import routing_headers
from gateway.uids import derived_uid
from pipelines._lab import cpu_session
from pipelines.wsimil.infer import ENCODER, HEAD
from pipelines.wsimil.lab.scene import SlideScene
from pipelines.wsimil.lab.wsi import SlideFiles, write_slide
from pipelines.wsimil.options import WsiMilOptions
from pipelines.wsimil.pipeline import WsiMilPipeline
from pipelines.wsimil.preprocess import MODEL_MPP, TILE_PX
from tests.conftest import REPO, GatewayProcess, Orthanc, storescu, wait_for
from tests.validators import dciodvfy

MODELS = REPO / "exported_models"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SIZE_UM = (1600.0, 1200.0)


def as_series(paths: list[Path]) -> Series:
    insts = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        insts.append(Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p, routing_headers(ds)))
    return Series(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.Modality), "SCANNER", insts)


@pytest.fixture(scope="module")
def sessions() -> dict[str, object]:
    return {name: cpu_session(MODELS / f"{name}.onnx", threads=None) for name in (ENCODER, HEAD)}


def context(sessions: dict[str, object]) -> tuple[RunContext, list[tuple[str, int]]]:
    flags: list[tuple[str, int]] = []
    ctx = RunContext(
        sessions=sessions,  # type: ignore[arg-type]
        uid=lambda key: derived_uid("test-wsi-mil", key),
        identity=Identity("aigw tests", "aigw", "0.0-test", "TEST-1"),
        workdir=Path("."),
        model_versions={ENCODER: "test", HEAD: "test"},
        flag=lambda kind, n: flags.append((kind, n)),
    )
    return ctx, flags


def slide(folder: Path, seed: int = 5, tumour: bool = True, **kw: object) -> tuple[SlideScene, SlideFiles]:
    scene = SlideScene(seed, *SIZE_UM, tumour=tumour)
    return scene, write_slide(scene, folder, base_mpp=1.0, tile=256, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory) -> tuple[SlideScene, SlideFiles]:
    return slide(tmp_path_factory.mktemp("pos"))


def split(out: list) -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    (seg,) = [d for d in out if d.SOPClassUID == SEG_STORAGE]
    (sr,) = [d for d in out if d.SOPClassUID == COMPREHENSIVE_3D_SR]
    return seg, sr


def seg_map(seg: hd.seg.Segmentation) -> np.ndarray:
    m = seg.get_total_pixel_matrix(segment_numbers=[1], combine_segments=False, rescale_fractional=True)
    return np.asarray(m, dtype=np.float32).reshape(m.shape[0], m.shape[1])


def test_selector(positive: tuple[SlideScene, SlideFiles], tmp_path: Path) -> None:
    pipe = WsiMilPipeline()
    sel = pipe.selects(as_series(positive[1].paths))
    assert sel.matched, sel.reason
    mr = tmp_path / "mr.dcm"
    ds = dcmread(positive[1].paths[0], stop_before_pixels=True)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.Modality = "MR"
    ds.save_as(mr)
    assert not pipe.selects(as_series([mr])).matched


def test_seg_and_sr_are_valid_aligned_and_reference_the_slide(
    positive: tuple[SlideScene, SlideFiles], sessions: dict[str, object], tmp_path: Path
) -> None:
    scene, files = positive
    ctx, flags = context(sessions)
    seg, sr = split(WsiMilPipeline().run(as_series(files.paths), ctx))
    assert not flags
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        errors = dciodvfy(tmp_path / name).errors
        assert not errors, f"{name}: " + "\n".join(errors)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sr = cast(hd.sr.Comprehensive3DSR, hd.sr.srread(tmp_path / "sr.dcm"))
    report: Any = sr.content  # a MeasurementReport; highdicom types it as a plain ContentSequence

    # geometry: slide Frame of Reference and orientation, one pixel per model tile, same area
    level = dcmread(files.levels[1].path, stop_before_pixels=True)  # base 1.0 um: level 1 is the model's 2.0 um
    assert seg.FrameOfReferenceUID == files.frame_of_reference_uid
    assert seg.ImageOrientationSlide == level.ImageOrientationSlide
    tile_mm = TILE_PX * MODEL_MPP / 1000
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([tile_mm, tile_mm])
    rows, cols = int(np.ceil(files.levels[1].rows / TILE_PX)), int(np.ceil(files.levels[1].columns / TILE_PX))
    assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == (rows, cols)
    origin = seg.TotalPixelMatrixOriginSequence[0]
    src = level.TotalPixelMatrixOriginSequence[0]
    # first SEG pixel centred on the first tile: (t - 1) / 2 source pixels along both axes
    half = (TILE_PX - 1) / 2 * float(level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    ori = np.array([float(v) for v in level.ImageOrientationSlide])
    expected = np.array([float(src.XOffsetInSlideCoordinateSystem), float(src.YOffsetInSlideCoordinateSystem), 0])
    expected += half * ori[:3] + half * ori[3:]
    got = [float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)]
    assert got == pytest.approx(expected[:2].tolist(), abs=1e-4)

    # references and segment description
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert level.SOPInstanceUID in refs

    # the map finds the tumour where it is
    prob = seg_map(seg)
    truth = scene.tumour_mask(0, 0, cols, rows, MODEL_MPP * TILE_PX)
    assert truth.any()
    assert prob[truth].mean() > prob[~truth].mean() + 0.3

    # report: Present, probability, area, references to the slide and the segmentation
    groups = report.get_planar_roi_measurement_groups() + report.get_volumetric_roi_measurement_groups()
    assert groups
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert {level.SOPInstanceUID, seg.SOPInstanceUID} <= evidence
    text = str(sr)
    assert "Present" in text and "Probability of cancer" in text

    # Every measurement names the algorithm that made it (TID 300 row 13 includes
    # TID 4019); TID 1411 has no group-level algorithm identification.
    algorithm_name = "111001"
    for group in groups:
        for m in group.get_measurements():
            names = [it.ConceptNameCodeSequence[0].CodeValue for it in m[0].get("ContentSequence", [])]
            assert algorithm_name in names, m.name.meaning
    for group in report.get_volumetric_roi_measurement_groups():
        assert algorithm_name not in [it.ConceptNameCodeSequence[0].CodeValue for it in group[0].ContentSequence]
    # Histopathology is not in CID 100: the code declares the extension (PS3.3 Table 8.8-1).
    (procedure,) = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "121058"]
    code = procedure.ConceptCodeSequence[0]
    assert (code.CodeValue, code.ContextIdentifier, code.MappingResource) == ("252416005", "100", "DCMR")
    assert code.ContextGroupExtensionFlag == "Y"
    assert code.ContextGroupLocalVersion and code.ContextGroupExtensionCreatorUID


@pytest.mark.parametrize("variant", [{"compression": "jpeg2000", "sparse": True}, {"compression": "none"}])
def test_pyramid_variants_give_the_same_answer(
    variant: dict[str, Any], positive: tuple[SlideScene, SlideFiles], sessions: dict[str, object], tmp_path: Path
) -> None:
    ctx, _ = context(sessions)
    ref = seg_map(split(WsiMilPipeline().run(as_series(positive[1].paths), ctx))[0])
    _, files = slide(tmp_path, **variant)
    got = seg_map(split(WsiMilPipeline().run(as_series(files.paths), ctx))[0])
    assert got.shape == ref.shape
    # JPEG artefacts differ between codecs: tile probabilities agree, not bit for bit
    assert np.abs(got - ref).mean() < 0.03
    assert ((got >= 0.5) == (ref >= 0.5)).mean() > 0.95


def test_single_level_and_missing_level_slides_give_a_sensible_result(
    positive: tuple[SlideScene, SlideFiles], sessions: dict[str, object], tmp_path: Path
) -> None:
    ctx, _ = context(sessions)
    ref = seg_map(split(WsiMilPipeline().run(as_series(positive[1].paths), ctx))[0])
    for name, kw in (("single", {"single_level": True}), ("missing", {"skip_levels": (1,)})):
        _, files = slide(tmp_path / name, **kw)
        got = seg_map(split(WsiMilPipeline().run(as_series(files.paths), ctx))[0])
        assert got.shape == ref.shape, name
        assert ((got >= 0.5) == (ref >= 0.5)).mean() > 0.9, name


def report_values(sr: hd.sr.Comprehensive3DSR) -> dict[str, Any]:
    """Numeric values and the presence verdict of the report, by concept name."""
    found: dict[str, Any] = {}

    def walk(items: Any) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if "MeasuredValueSequence" in item:
                found[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif "ConceptCodeSequence" in item:
                found.setdefault(name, item.ConceptCodeSequence[0].CodeMeaning)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_thresholds_change_the_report(
    positive: tuple[SlideScene, SlideFiles], sessions: dict[str, object], tmp_path: Path
) -> None:
    # A negative slide called positive by a slide threshold of 0; its probability says the default would not.
    _, negative = slide(tmp_path, seed=8, tumour=False)
    ctx, _ = context(sessions)
    _, sr = split(WsiMilPipeline(WsiMilOptions(slide_threshold=0.0)).run(as_series(negative.paths), ctx))
    got = report_values(sr)
    assert got["Probability of cancer"] < WsiMilOptions().slide_threshold
    assert got["Presence of property"] == "Present"

    # A stricter tile threshold counts fewer tiles in the tumour area; the map itself is the same.
    ctx, _ = context(sessions)
    seg, sr = split(WsiMilPipeline(WsiMilOptions(tile_threshold=0.99)).run(as_series(positive[1].paths), ctx))
    prob = seg_map(seg)
    tile_mm2 = (TILE_PX * MODEL_MPP / 1000) ** 2
    area = report_values(sr)["Area"]
    assert area < np.count_nonzero(prob >= 0.5) * tile_mm2
    # the SEG keeps probabilities in 1/255 steps: the area is that of the tiles at or above 0.99, give or take a step
    lo, hi = np.count_nonzero(prob >= 0.99 + 1 / 255), np.count_nonzero(prob >= 0.99 - 1 / 255)
    assert lo * tile_mm2 - 1e-4 <= area <= hi * tile_mm2 + 1e-4


def test_defaults_are_those_the_model_was_evaluated_with() -> None:
    head = json.loads((MODELS / f"{HEAD}.json").read_text())
    opts = WsiMilOptions()
    assert head["preprocessing"]["slide_threshold"] == opts.slide_threshold
    assert head["preprocessing"]["tile_threshold"] == opts.tile_threshold
    assert WsiMilPipeline().options == opts


def test_the_service_never_imports_the_lab() -> None:
    # what a job imports: the plugin, its writers and a run's lazy imports; the lab only for the demo hooks
    code = (
        "import sys\n"
        "import pipelines.wsimil.pipeline, pipelines.wsimil.dicom\n"
        "lab = sorted(m for m in sys.modules if m.startswith('pipelines.wsimil.lab'))\n"
        "assert not lab, lab\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    "options",
    [
        {"slide_threshold": 1.5},
        {"tile_threshold": -0.1},
        {"max_unreadable_fraction": 2},
        {"tile_threshold": float("nan")},
        {"slide_threshold": "high"},
        {"threshold": 0.5},  # unknown key (a typo of a real one is refused, not ignored)
    ],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        WsiMilOptions.model_validate(options)


def test_no_tissue_is_a_clear_failure(sessions: dict[str, object], tmp_path: Path) -> None:
    scene = SlideScene(3, *SIZE_UM, tissue=False)
    files = write_slide(scene, tmp_path, base_mpp=1.0, tile=256)
    ctx, _ = context(sessions)
    with pytest.raises(InputError, match="no tissue"):
        WsiMilPipeline().run(as_series(files.paths), ctx)


def _corrupt_frames(path: Path, which: Callable[[int, int], bool]) -> int:
    """Overwrite the JPEG start-of-image marker of the frames ``which(index, count)`` picks; returns how many."""
    data = bytearray(path.read_bytes())
    # encapsulated Pixel Data: (7FE0,0010) OB, undefined length (PS3.5 A.4)
    pos = data.find(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    items = []
    while data[pos : pos + 4] == b"\xfe\xff\x00\xe0":  # item tag
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos + 8 : pos + 10] == b"\xff\xd8":  # a frame, not the offset table
            items.append(pos + 8)
        pos += 8 + length
    picked = [start for k, start in enumerate(items) if which(k, len(items))]
    for start in picked:
        data[start : start + 2] = b"\x00\x00"
    path.write_bytes(bytes(data))
    return len(picked)


def test_corrupt_tiles_are_left_out_or_fail_the_job(sessions: dict[str, object], tmp_path: Path) -> None:
    _, files = slide(tmp_path / "one", seed=6)
    assert _corrupt_frames(files.levels[1].path, lambda k, n: k == n // 2) == 1  # a frame inside the tissue
    ctx, flags = context(sessions)
    split(WsiMilPipeline(WsiMilOptions(max_unreadable_fraction=0.5)).run(as_series(files.paths), ctx))
    assert flags and flags[0][0] == "unreadable_tile" and flags[0][1] > 0
    _, files = slide(tmp_path / "all", seed=6)
    assert _corrupt_frames(files.levels[1].path, lambda k, n: True) > 1
    ctx, flags = context(sessions)
    with pytest.raises(InputError, match="could not be decoded"):
        WsiMilPipeline().run(as_series(files.paths), ctx)


def test_not_a_slide_is_a_clear_failure(
    positive: tuple[SlideScene, SlideFiles], sessions: dict[str, object], tmp_path: Path
) -> None:
    ds = dcmread(positive[1].paths[0])
    del ds.TotalPixelMatrixColumns
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    ctx, _ = context(sessions)
    with pytest.raises(InputError):
        WsiMilPipeline().run(as_series([bad]), ctx)


@pytest.mark.peers
def test_end_to_end_seg_and_sr_arrive_in_orthanc(
    positive: tuple[SlideScene, SlideFiles], orthanc: Orthanc, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], models=MODELS)
    # -R: propose the slide's SOP class (not in storescu's default list); -xy: with JPEG baseline
    assert storescu(gw.port, positive[1].paths, extra=["-R", "-xy"]).returncode == 0
    uids = wait_for(lambda: len(orthanc.instance_uids()) >= 2 and orthanc.instance_uids(), 180, "SEG and SR in Orthanc")
    assert len(uids) == len(set(uids)) == 2  # each result once
    classes = set()
    for iid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{iid}/simplified-tags")
        classes.add(tags["SOPClassUID"])
        assert tags["StudyInstanceUID"] == positive[1].study_uid
    assert classes == {SEG_STORAGE, COMPREHENSIVE_3D_SR}
