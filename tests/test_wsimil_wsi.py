"""The wsi-mil slide writer: VL Whole Slide Microscopy pyramids from the synthetic scene.

Each variant is written once per module and then judged three ways: dciodvfy
(the IOD), wsidicom (the maintained WSI reader: levels, label, overview,
thumbnail, pixels) and pydicom (frames decode). Pixels are compared with
``SlideScene.render`` of the same tiles: exact for the lossless encodings,
close for JPEG.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from wsidicom import WsiDicom
from wsidicom.errors import WsiDicomNotFoundError

import pipelines.wsimil.lab.wsi as wsi
from pipelines.wsimil.lab.scene import SlideScene
from pipelines.wsimil.lab.wsi import LevelInfo, SlideFiles, write_slide
from pipelines.wsimil.preprocess import SATURATION_THRESHOLD, saturation
from tests.validators import dciodvfy

SEED, WIDTH_UM, HEIGHT_UM, BASE_MPP, TILE = 7, 1200, 900, 1.0, 128
VARIANTS: dict[str, dict[str, object]] = {
    "jpeg": {"compression": "jpeg"},
    "jpeg2000": {"compression": "jpeg2000"},
    "none": {"compression": "none"},
    "sparse": {"compression": "jpeg", "sparse": True},
}
LOSSLESS = {"jpeg2000", "none"}
# dciodvfy (dicom3tools) checks NumberOfFrames against the full tile grid whatever the Dimension
# Organization Type, but TILED_SPARSE may leave tiles out (PS3.3 C.7.6.17.3); this one finding
# is expected for a sparse level with glass tiles omitted, and nothing else is.
SPARSE_FRAME_COUNT_FINDING = "NumberOfFrames does not match expected value for tiled total pixel matrix"


def scene() -> SlideScene:
    return SlideScene(SEED, WIDTH_UM, HEIGHT_UM, tumour=True)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SlideFiles]:
    """The slide of a variant, written on first use."""
    written: dict[str, SlideFiles] = {}

    def get(variant: str) -> SlideFiles:
        if variant not in written:
            t0 = time.perf_counter()
            written[variant] = write_slide(
                scene(),
                tmp_path_factory.mktemp(variant),
                base_mpp=BASE_MPP,
                tile=TILE,
                **VARIANTS[variant],  # type: ignore[arg-type]
            )
            print(f"wrote {variant} in {time.perf_counter() - t0:.1f} s")
        return written[variant]

    return get


def reference(sc: SlideScene, level: LevelInfo) -> np.ndarray:
    """The level as the writer renders it: tile by tile, cropped to the total pixel matrix."""
    out = np.zeros((level.rows, level.columns, 3), np.uint8)
    t = level.tile
    for y in range(0, level.rows, t):
        for x in range(0, level.columns, t):
            h, w = min(t, level.rows - y), min(t, level.columns - x)
            out[y : y + h, x : x + w] = sc.render(x, y, t, t, level.mpp)[:h, :w]
    return out


def pyramid_index(files: SlideFiles, level: LevelInfo) -> int:
    """wsidicom's level number: log2 of the downsampling from the base it found."""
    return round(math.log2(level.mpp / files.base_mpp))


def headers(files: SlideFiles) -> Iterator[pydicom.Dataset]:
    for path in files.paths:
        yield pydicom.dcmread(path, stop_before_pixels=True)


# --------------------------------------------------------------------------- DICOM validity


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_file_passes_dciodvfy(slide: Callable[[str], SlideFiles], variant: str) -> None:
    files = slide(variant)
    assert [p.name for p in files.paths] == [f"level-{k}.dcm" for k in range(5)] + [
        "label.dcm",
        "overview.dcm",
        "thumbnail.dcm",
    ]
    for path in files.paths:
        errors = dciodvfy(path).errors
        if variant == "sparse":
            info = next((lv for lv in files.levels if lv.path == path), None)
            full_grid = info is None or info.frames == math.ceil(info.columns / TILE) * math.ceil(info.rows / TILE)
            expected = [] if full_grid else [e for e in errors if SPARSE_FRAME_COUNT_FINDING in e]
            assert errors == expected, f"{path.name}:\n" + "\n".join(errors)
        else:
            assert not errors, f"{path.name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_headers_share_the_slide_and_describe_the_encoding(slide: Callable[[str], SlideFiles], variant: str) -> None:
    files = slide(variant)
    codec = wsi.Compression(VARIANTS[variant]["compression"])
    pyramid_uids, containers = set(), set()
    for ds in headers(files):
        assert ds.SOPClassUID == wsi.VL_WSI_STORAGE
        assert ds.file_meta.TransferSyntaxUID == codec.transfer_syntax
        assert ds.StudyInstanceUID == files.study_uid
        assert ds.SeriesInstanceUID == files.series_uid
        assert ds.FrameOfReferenceUID == files.frame_of_reference_uid
        assert ds.PhotometricInterpretation == codec.photometric_interpretation
        assert ds.PatientName == "SYNTHETIC^SLIDE" and ds.PatientSex == "O" and ds.PatientBirthDate == ""
        containers.add(ds.ContainerIdentifier)
        flavour = ds.ImageType[2]
        if flavour in ("VOLUME", "THUMBNAIL"):
            pyramid_uids.add(ds.PyramidUID)
            origin = ds.TotalPixelMatrixOriginSequence[0]
            assert (float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)) == (
                pytest.approx(files.origin_mm[0]),
                pytest.approx(files.origin_mm[1]),
            )
        shows_label = flavour in ("LABEL", "OVERVIEW")
        assert ds.SpecimenLabelInImage == ds.BurnedInAnnotation == ("YES" if shows_label else "NO")
        if codec is wsi.Compression.JPEG:
            assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
            assert float(ds.LossyImageCompressionRatio) > 2
        else:
            assert ds.LossyImageCompression == "00"
    assert len(pyramid_uids) == 1 and len(containers) == 1
    image_types = [list(ds.ImageType) for ds in headers(files)]
    assert image_types[0] == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert all(t == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"] for t in image_types[1:5])
    assert image_types[5:] == [
        ["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
        ["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"],
        ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"],
    ]


# --------------------------------------------------------------------------- reading back


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wsidicom_reads_the_pyramid_as_rendered(slide: Callable[[str], SlideFiles], variant: str) -> None:
    files = slide(variant)
    sc = scene()
    assert [(lv.columns, lv.rows) for lv in files.levels] == [
        (math.ceil(WIDTH_UM / (BASE_MPP * 2**k)), math.ceil(HEIGHT_UM / (BASE_MPP * 2**k))) for k in range(5)
    ]
    assert max(files.levels[-1].columns, files.levels[-1].rows) <= TILE < max(files.levels[-2].columns, 1)
    with WsiDicom.open(files.folder) as w:
        assert [lv.level for lv in w.levels] == [0, 1, 2, 3, 4]
        assert [lv.mpp.width for lv in w.levels] == pytest.approx([lv.mpp for lv in files.levels])
        assert w.labels is not None and w.overviews is not None and w.pyramid.thumbnails is not None
        assert len(w.pyramid.thumbnails.groups) == 1
        assert w.read_label().size == (500, 650)
        assert w.read_overview().size == (1900, 650)
        for level in files.levels:
            got = w.read_region((0, 0), pyramid_index(files, level), (level.columns, level.rows), as_array=True)
            ref = reference(sc, level)
            assert got.shape == ref.shape
            if variant == "sparse":
                present = _present_tiles(files, level)
                mask = np.kron(present, np.ones((TILE, TILE), bool))[: level.rows, : level.columns]
                err = np.abs(got.astype(int) - ref)[mask]
            else:
                err = np.abs(got.astype(int) - ref)
            if variant in LOSSLESS:
                assert err.max() == 0, f"level {level.mpp} um/px differs"
            else:
                assert err.mean() < 6, f"level {level.mpp} um/px: mean abs error {err.mean():.2f}"


def _present_tiles(files: SlideFiles, level: LevelInfo) -> np.ndarray:
    ds = pydicom.dcmread(level.path, stop_before_pixels=True)
    across, down = math.ceil(level.columns / TILE), math.ceil(level.rows / TILE)
    present = np.zeros((down, across), bool)
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSlideSequence[0]
        present[
            (pos.RowPositionInTotalImagePixelMatrix - 1) // TILE,
            (pos.ColumnPositionInTotalImagePixelMatrix - 1) // TILE,
        ] = True
    return present


def test_sparse_leaves_out_only_glass_and_places_frames_like_highdicom(slide: Callable[[str], SlideFiles]) -> None:
    sparse, full = slide("sparse"), slide("jpeg")
    sc = scene()
    base = sparse.levels[0]
    across, down = math.ceil(base.columns / TILE), math.ceil(base.rows / TILE)
    assert 0 < base.frames < across * down, "the base level should have left glass tiles out"
    present = _present_tiles(sparse, base)
    assert present.sum() == base.frames
    for r, c in zip(*np.nonzero(~present)):
        tile = sc.render(int(c) * TILE, int(r) * TILE, TILE, TILE, base.mpp)
        assert (saturation(tile) > SATURATION_THRESHOLD).mean() < 0.001, f"tile {r},{c} with stain was left out"
    # Plane Position (Slide) of each sparse frame is where highdicom puts the same tile of the TILED_FULL level
    full_positions = {
        (int(p[0].ColumnPositionInTotalImagePixelMatrix), int(p[0].RowPositionInTotalImagePixelMatrix)): p[0]
        for p in hd.utils.compute_plane_position_slide_per_frame(pydicom.dcmread(full.levels[0].path))
    }
    ds = pydicom.dcmread(base.path, stop_before_pixels=True)
    assert ds.DimensionOrganizationType == "TILED_SPARSE"
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSlideSequence[0]
        ref = full_positions[(pos.ColumnPositionInTotalImagePixelMatrix, pos.RowPositionInTotalImagePixelMatrix)]
        for key in ("XOffsetInSlideCoordinateSystem", "YOffsetInSlideCoordinateSystem"):
            assert float(pos[key].value) == pytest.approx(float(ref[key].value), abs=1e-6)
        assert float(pos.ZOffsetInSlideCoordinateSystem) == 0.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pydicom_decodes_the_frames(slide: Callable[[str], SlideFiles], variant: str) -> None:
    files = slide(variant)
    level = files.levels[1]
    frames = pydicom.dcmread(level.path).pixel_array
    assert frames.shape == (level.frames, TILE, TILE, 3)
    ref = scene().render(0, 0, TILE, TILE, level.mpp)
    err = np.abs(frames[0].astype(int) - ref)
    if variant in LOSSLESS:
        assert err.max() == 0
    else:
        assert err.mean() < 6


def test_overview_shows_the_tissue_where_the_pyramid_says_it_lies(slide: Callable[[str], SlideFiles]) -> None:
    files = slide("none")
    ov = pydicom.dcmread(files.folder / "overview.dcm")
    spacing = float(ov.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    origin = ov.TotalPixelMatrixOriginSequence[0]
    # The overview pixel that maps onto the pyramid's origin, by highdicom's reading of the geometry:
    # found with the inverse transform (which rounds to whole pixels), then checked with the forward one
    geometry: dict[str, Any] = {
        "image_position": (
            float(origin.XOffsetInSlideCoordinateSystem),
            float(origin.YOffsetInSlideCoordinateSystem),
            0,
        ),
        "image_orientation": [float(v) for v in ov.ImageOrientationSlide],
        "pixel_spacing": (spacing, spacing),
    }
    col, row, _ = hd.spatial.ReferenceToPixelTransformer(**geometry)(np.array([[*files.origin_mm, 0.0]]))[0]
    x, y, _ = hd.spatial.PixelToReferenceTransformer(**geometry)(np.array([[col, row]]))[0]
    assert (x, y) == (pytest.approx(files.origin_mm[0], abs=1e-9), pytest.approx(files.origin_mm[1], abs=1e-9))
    assert col == 625  # 25 mm from the label end of the glass
    mpp = spacing * 1000
    w, h = math.ceil(WIDTH_UM / mpp), math.ceil(HEIGHT_UM / mpp)
    # One render call: the scanned area is smaller than the writer's 256-pixel chunks at this resolution
    expected = scene().render(0, 0, w, h, mpp)
    assert np.array_equal(ov.pixel_array[row : row + h, col : col + w], expected)
    label = pydicom.dcmread(files.folder / "label.dcm")
    assert np.array_equal(ov.pixel_array[: label.Rows, : label.Columns], label.pixel_array)
    assert label.LabelText == f"SYNTH {SEED}" and label.BarcodeValue


# --------------------------------------------------------------------------- options and limits


def test_skip_levels_and_single_level_write_what_they_claim(tmp_path: Path) -> None:
    sc = SlideScene(3, 1000, 700)
    files = write_slide(sc, tmp_path / "skip", base_mpp=1.0, tile=128, skip_levels=[1], extras=("thumbnail",))
    assert [p.name for p in files.paths] == ["level-0.dcm", "level-2.dcm", "level-3.dcm", "thumbnail.dcm"]
    assert [lv.mpp for lv in files.levels] == [1.0, 4.0, 8.0]
    with WsiDicom.open(files.folder) as w:
        assert [lv.level for lv in w.levels] == [0, 2, 3]
        with pytest.raises(WsiDicomNotFoundError):
            w.levels.get(1)
        # wsidicom fills the gap by scaling the next larger level
        assert w.read_region((0, 0), 1, (500, 350), as_array=True).shape == (350, 500, 3)
        assert w.labels is None and w.overviews is None

    single = write_slide(sc, tmp_path / "single", base_mpp=1.0, tile=128, single_level=True, extras=())
    assert [p.name for p in single.paths] == ["level-0.dcm"] and len(single.levels) == 1
    with WsiDicom.open(single.folder) as w:
        assert len(w.levels) == 1 and w.levels[0].size.to_tuple() == (1000, 700)
    assert not dciodvfy(single.paths[0]).errors

    coarse = write_slide(sc, tmp_path / "min", base_mpp=1.0, tile=128, min_level_size=400, extras=())
    assert [(lv.columns, lv.rows) for lv in coarse.levels] == [(1000, 700), (500, 350), (250, 175)]


def test_extended_offset_table_when_the_basic_one_could_overflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsi, "_BOT_LIMIT_BYTES", 1000)
    sc = SlideScene(4, 700, 500)
    files = write_slide(sc, tmp_path, base_mpp=1.0, tile=128, single_level=True, extras=())
    ds = pydicom.dcmread(files.paths[0])
    assert len(ds.ExtendedOffsetTable) == len(ds.ExtendedOffsetTableLengths) == 8 * files.levels[0].frames
    assert np.abs(ds.pixel_array[-1].astype(int) - sc.render(5 * 128, 3 * 128, 128, 128, 1.0)).mean() < 6
    assert not dciodvfy(files.paths[0]).errors
    with WsiDicom.open(files.folder) as w:
        got = w.read_region((0, 0), 0, (700, 500), as_array=True)
    assert np.abs(got.astype(int) - reference(sc, files.levels[0])).mean() < 6


def test_native_pixel_data_over_4_gib_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsi, "_MAX_NATIVE_BYTES", 10 * 128 * 128 * 3)
    with pytest.raises(ValueError, match="do not fit the 32-bit length"):
        write_slide(SlideScene(4, 700, 500), tmp_path, base_mpp=1.0, tile=128, compression="none", extras=())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"compression": "png"}, "compression must be one of"),
        ({"extras": ("macro",)}, "extras must be among"),
        ({"skip_levels": [0, 1, 2, 3]}, "every pyramid level is skipped"),
        ({"skip_levels": [9]}, "out of range"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_slide(SlideScene(4, 700, 500), tmp_path, base_mpp=1.0, tile=128, **kw)  # type: ignore[arg-type]


def test_same_slide_same_bytes_other_encoding_other_uids(tmp_path: Path) -> None:
    sc = SlideScene(5, 600, 400)
    a = write_slide(sc, tmp_path / "a", base_mpp=2.0, tile=128, single_level=True, extras=())
    b = write_slide(sc, tmp_path / "b", base_mpp=2.0, tile=128, single_level=True, extras=())
    c = write_slide(sc, tmp_path / "c", base_mpp=2.0, tile=128, single_level=True, extras=(), compression="none")
    assert a.paths[0].read_bytes() == b.paths[0].read_bytes()
    assert a.study_uid == c.study_uid
    assert a.series_uid != c.series_uid and a.levels[0].sop_instance_uid != c.levels[0].sop_instance_uid


# --------------------------------------------------------------------------- memory


class _CheapScene(SlideScene):
    """The real scene's geometry and tissue, with a render cheap enough to write a large level quickly.

    The writer's memory is what is measured here; the scene's own render temporaries are not.
    """

    def render(self, x_px: int, y_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        ys = ((y_px + np.arange(h)) * mpp)[:, None]
        xs = ((x_px + np.arange(w)) * mpp)[None, :]
        base = 200 + 40 * np.sin(xs / 37.0) * np.cos(ys / 53.0)
        rgb = np.stack([base, base * 0.8, base * 0.9], axis=-1)
        return np.clip(rgb, 0, 255).astype(np.uint8)


def test_peak_memory_stays_far_below_a_level(tmp_path: Path) -> None:
    sc = _CheapScene(11, 4000, 4000)
    raw = 8000 * 8000 * 3  # the base level, decoded
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        files = write_slide(sc, tmp_path, base_mpp=0.5, tile=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t0
    assert (files.levels[0].columns, files.levels[0].rows) == (8000, 8000)
    print(f"8000x8000 base, {len(files.levels)} levels in {seconds:.1f} s; traced peak {peak / 1e6:.1f} MB")
    assert peak < raw / 4, f"traced peak {peak / 1e6:.1f} MB for a {raw / 1e6:.0f} MB level"
    with WsiDicom.open(files.folder) as w:
        top = files.levels[-1]
        got = w.read_region((0, 0), pyramid_index(files, top), (top.columns, top.rows), as_array=True)
    assert np.abs(got.astype(int) - reference(sc, top)).mean() < 6
