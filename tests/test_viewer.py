"""The viewer harness: Orthanc with DICOMweb, OHIF served in front of it, headless Chromium, pixel statistics."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file

from gateway.apps.viewer import OhifServer, Orthanc, Screenshot, Viewer, ViewerMode, image_stats
from gateway.apps.viewer.modes import _pyramid_conflict
from tests.conftest import http_get, mr_series


def mr_small_series(folder: Path, seed: int, n: int = 3, pixels: str = "anatomy") -> list[Path]:
    """An MR series of pydicom's MR_small: its own head image, all zeros, or nothing else changed.

    Slices step along the image normal (MR_small is axial), so OHIF sees a
    regular stack; each series has a study of its own.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = dcmread(str(get_testdata_file("MR_small.dcm")))
    paths = []
    for k in range(n):
        ds = base.copy()
        ds.StudyInstanceUID = f"2.25.{seed}1"
        ds.SeriesInstanceUID = f"2.25.{seed}2"
        ds.SOPInstanceUID = f"2.25.{seed}3{k + 1:04d}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = f"MR small {pixels}"
        ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 2.0 * k]
        ds.SliceLocation = 6.6406 + 2.0 * k
        if pixels == "zeros":
            ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype="<i2").tobytes()
        path = folder / f"mr{k + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _shoot(viewer: Viewer, files: list[Path], out: Path) -> Screenshot:
    viewer.upload(files)
    ds = dcmread(files[0], stop_before_pixels=True)
    return viewer.screenshot_series(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), out, timeout=120)


@pytest.mark.peers
def test_an_mr_series_renders_in_ohif_neither_blank_nor_saturated(viewer: Viewer, tmp_path: Path) -> None:
    files = mr_small_series(tmp_path / "in", seed=61)
    shot = _shoot(viewer, files, tmp_path / "mr.png")
    assert shot.mode is ViewerMode.VIEWER and "/viewer?" in shot.url
    with Image.open(shot.page_png) as page, Image.open(shot.viewport_png) as vp:
        assert page.size == viewer.size
        assert vp.width < page.width and vp.height < page.height
    # The 64 x 64 image, fitted to the viewport, square, inside the crop.
    assert shot.image_box is not None
    left, top, right, bottom = shot.image_box
    assert 0 <= left < right <= vp.width and 0 <= top < bottom <= vp.height
    assert abs((right - left) - (bottom - top)) <= 2 and right - left > 200
    assert shot.stats.problems() == [], shot.stats
    assert shot.stats.grey_levels >= 64 and shot.stats.std > 20


@pytest.mark.peers
@pytest.mark.parametrize("pixels", ["zeros", "noise"])
def test_the_check_fails_for_a_blank_or_a_saturated_series(viewer: Viewer, tmp_path: Path, pixels: str) -> None:
    if pixels == "zeros":
        files, expected = mr_small_series(tmp_path / "in", seed=62, pixels="zeros"), "blank"
    else:
        # conftest's noise, 0..4000, under MR_small's window 600 +- 800: mostly white.
        files, expected = mr_series(tmp_path / "in", n=3, seed=63), "saturated"
    shot = _shoot(viewer, files, tmp_path / f"{pixels}.png")
    assert shot.mode is ViewerMode.VIEWER
    problems = shot.stats.problems()
    assert any(p.startswith(expected) for p in problems), (problems, shot.stats)


def _map_and_report(folder: Path) -> tuple[list[Path], Path, Path]:
    """A series of 4 MR images at 2 positions (think two b-values), a 2-frame Parametric Map
    of it and an SR whose one measurement has no image region."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    files = mr_small_series(folder / "in", seed=66, n=4)
    images = [dcmread(p) for p in files]
    for k in (2, 3):
        images[k].ImagePositionPatient = images[k - 2].ImagePositionPatient
        images[k].save_as(files[k], enforce_file_format=True)
    values = np.stack([images[k].pixel_array for k in (0, 1)]).astype(np.float32) / 1000
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="T",
        lut_explanation="test map",
        unit=codes.UCUM.Second,
        value_range=(float(values.min()), float(values.max())),
        slope=1,
        intercept=0,
    )
    window = hd.VOILUTTransformation(window_center=float(values.mean()), window_width=float(np.ptp(values)))
    pm = hd.pm.ParametricMap(
        images[:2], values, "2.25.6671", 10, "2.25.6672", 1, "aigw", "aigw", "1", "TEST-1",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[window],
    )  # fmt: skip
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid="2.25.6673", name="aigw"),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.6674", identifier="whole series"),
        measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=42.0, unit=codes.UCUM.SquareMillimeter)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[images[0]], content=report[0], series_number=11, series_instance_uid="2.25.6675",
        sop_instance_uid="2.25.6676", instance_number=1, manufacturer="aigw", series_description="report",
    )  # fmt: skip
    pm.save_as(folder / "pm.dcm")
    sr.save_as(folder / "sr.dcm")
    return files, folder / "pm.dcm", folder / "sr.dcm"


@pytest.mark.peers
def test_what_ohif_cannot_show_goes_to_the_fallback(viewer: Viewer, tmp_path: Path) -> None:
    files, pm, sr = _map_and_report(tmp_path)
    viewer.upload([*files, pm, sr])
    study = str(dcmread(pm, stop_before_pixels=True).StudyInstanceUID)

    mode, why = viewer.choose_mode("2.25.6671")
    assert mode is ViewerMode.FALLBACK and "2 frames, source series 4 images" in why
    shot = viewer.screenshot_series(study, "2.25.6671", tmp_path / "pm.png")
    assert shot.mode is ViewerMode.FALLBACK and shot.url == "" and shot.notes == (why,)
    # Orthanc cannot render float pixels (HTTP 415): the harness's own picture, through the map's window
    assert shot.stats.problems() == [], shot.stats
    with Image.open(shot.viewport_png) as picture:
        assert min(picture.size) >= 512

    mode, why = viewer.choose_mode("2.25.6675")
    assert mode is ViewerMode.FALLBACK and "SCOORD" in why
    shot = viewer.screenshot_series(study, "2.25.6675", tmp_path / "sr.png")
    assert shot.mode is ViewerMode.FALLBACK and shot.stats.grey_levels > 2  # the report as text

    # the source series itself is an ordinary stack
    assert viewer.choose_mode(str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))[0] is ViewerMode.VIEWER


@pytest.mark.peers
def test_ohif_server_serves_the_app_its_config_and_proxies_dicomweb(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "pacs", dicomweb=True).start()
    server = OhifServer(pacs.http_port).start()
    try:
        pacs.upload(mr_small_series(tmp_path / "in", seed=64, n=1))
        code, body = http_get(f"{server.url}/viewer?StudyInstanceUIDs=1.2.3")  # a client-side route
        assert code == 200 and b'id="root"' in body
        code, body = http_get(f"{server.url}/app-config.js")
        assert code == 200 and b"/dicom-web" in body and b"investigationalUseDialog" in body
        assert http_get(f"{server.url}/no-such-bundle.js")[0] == 404  # files stay files
        assert http_get(f"{server.url}/../../etc/passwd")[0] in (400, 404)
        request = urllib.request.Request(
            f"{server.url}/dicom-web/studies?StudyInstanceUID=2.25.641", headers={"Accept": "application/dicom+json"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/dicom+json")
            (study,) = json.loads(r.read())
        assert study["0020000D"]["Value"] == ["2.25.641"]
        series_id = pacs.series_id("2.25.642")
        assert pacs.get(f"/series/{series_id}")["MainDicomTags"]["SeriesInstanceUID"] == "2.25.642"
        with pytest.raises(KeyError):
            pacs.series_id("2.25.999")
    finally:
        server.stop()
        pacs.stop()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_stats_tell_blank_saturated_and_spread_apart() -> None:
    ramp = np.tile(np.arange(256), (32, 1))
    assert image_stats(_png(ramp)).problems() == []
    blank = image_stats(_png(np.zeros((32, 32))))
    assert blank.black_fraction == 1 and any(p.startswith("blank") for p in blank.problems())
    white = image_stats(_png(np.full((32, 32), 255)))
    assert white.white_fraction == 1 and any(p.startswith("saturated") for p in white.problems())
    # one grey, whichever: blank (a viewer shows a constant image at its window's grey)
    grey = image_stats(_png(np.full((32, 32), 32)))
    assert grey.uniform_fraction == 1 and grey.uniform_level == 32
    assert any(p.startswith("blank") for p in grey.problems())
    two = image_stats(_png(np.where(ramp < 128, 60, 200)))
    assert two.grey_levels == 2 and any(p.startswith("flat") for p in two.problems())
    # a box picks the region: the dark half of the ramp only
    half = image_stats(_png(ramp), box=(0, 0, 16, 32))
    assert (half.width, half.height) == (16, 32) and half.black_fraction > 0.9


def test_a_thumbnail_the_size_of_a_level_is_a_pyramid_conflict() -> None:
    def image(flavour: str, cols: int) -> tuple[str, dict[str, object]]:
        return flavour, {"ImageType": f"ORIGINAL\\PRIMARY\\{flavour}\\NONE", "TotalPixelMatrixColumns": cols}

    levels = [image("VOLUME", 1600), image("VOLUME", 800), image("VOLUME", 400), image("LABEL", 500)]
    assert _pyramid_conflict(levels) == ""
    assert _pyramid_conflict([*levels, image("THUMBNAIL", 200)]) == ""
    why = _pyramid_conflict([*levels, image("THUMBNAIL", 1024)])
    assert "THUMBNAIL 1024 px and VOLUME 800 px" in why
