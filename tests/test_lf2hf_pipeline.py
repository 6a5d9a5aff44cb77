"""The lf2hf pipeline: selection, options, derived series geometry and validity, bad input, end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import dcmread

from gateway.contract import Identity, InputError, Instance, RunContext, Series
from gateway.headers import routing_headers
from gateway.uids import derived_uid
from pipelines._lab import cpu_session
from pipelines.lf2hf.dicom import AI_LABEL, LEARNED_PRESERVED_LABEL, PRESERVED_LABEL
from pipelines.lf2hf.lab.synthetic import write_lowfield_series
from pipelines.lf2hf.options import Lf2hfOptions
from pipelines.lf2hf.pipeline import Lf2hfPipeline
from tests.conftest import REPO, GatewayProcess, Orthanc, storescu, wait_for
from tests.validators import dciodvfy

MODEL_PATH = REPO / "exported_models" / "lf2hf-net.onnx"
RESTORE_PATH = REPO / "exported_models" / "lf2hf-dc.onnx"


def as_series(paths: list[Path]) -> Series:
    """The series the gateway would assemble from ``paths`` (headers indexed as on arrival)."""
    insts = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        insts.append(Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p, routing_headers(ds)))
    return Series(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), "MR", "SCANNER", insts)


def context() -> tuple[RunContext, list[tuple[str, int]]]:
    flags: list[tuple[str, int]] = []
    ctx = RunContext(
        sessions={"lf2hf-net": cpu_session(MODEL_PATH), "lf2hf-dc": cpu_session(RESTORE_PATH)},
        uid=lambda key: derived_uid("test-lf2hf", key),
        identity=Identity("aigw tests", "aigw", "0.0-test", "TEST-1"),
        workdir=Path("."),
        model_versions={"lf2hf-net": "test"},
        flag=lambda kind, n: flags.append((kind, n)),
    )
    return ctx, flags


@pytest.fixture(scope="module")
def lowfield(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_lowfield_series(tmp_path_factory.mktemp("lf"), seed=11, matrix=(96, 88), slices=(70, 80, 90))


def test_selector(lowfield: list[Path], tmp_path: Path) -> None:
    pipe = Lf2hfPipeline()
    assert pipe.selects(as_series(lowfield)).matched
    for value, reason in ((None, "missing"), (3.0, "not below")):
        paths = []
        for p in lowfield:
            ds = dcmread(p)
            if value is None:
                del ds.MagneticFieldStrength
            else:
                ds.MagneticFieldStrength = value
            paths.append(tmp_path / f"{value}_{p.name}")
            ds.save_as(paths[-1])
        sel = pipe.selects(as_series(paths))
        assert not sel.matched and reason in sel.reason


def test_derived_series_geometry_validity_and_consistency(lowfield: list[Path], tmp_path: Path) -> None:
    ctx, flags = context()
    out = Lf2hfPipeline().run(as_series(lowfield), ctx)
    assert len(out) == len(lowfield)
    for k, (ds, src_path) in enumerate(zip(out, sorted(lowfield))):
        src = dcmread(src_path)
        assert (ds.Rows, ds.Columns) == (2 * src.Rows, 2 * src.Columns)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) / 2 for v in src.PixelSpacing])
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.ImageOrientationPatient == src.ImageOrientationPatient
        # Zero-filled k-space grid: fine pixel 2j is acquired pixel j, so the first pixel stays where it was.
        expected = np.array([float(v) for v in src.ImagePositionPatient])
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-3)
        assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"]
        # In domain (a simulated low-field brain): the gate lets the AI contrast translation run, and says so.
        assert ds.SeriesDescription.startswith(AI_LABEL)
        assert "3 T-like contrast" in ds.DerivationDescription and "domain gate passed" in ds.DerivationDescription
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert "consistency score" in ds.ImageComments
        path = tmp_path / f"out{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors = dciodvfy(path).errors
        assert not errors, errors
        assert dcmread(path).pixel_array.shape == (2 * src.Rows, 2 * src.Columns)
    assert sum(n for _, n in flags) == 0  # the model's own output is consistent with its input


def test_bad_input(lowfield: list[Path], tmp_path: Path) -> None:
    pipe = Lf2hfPipeline()
    ctx, _ = context()
    # A single slice and a non-square matrix give a sensible result.
    one = pipe.run(as_series(lowfield[:1]), ctx)
    assert len(one) == 1 and one[0].Rows == 2 * dcmread(lowfield[0]).Rows
    # Missing field strength: a clear failure unless the site says what to assume.
    ds = dcmread(lowfield[0])
    del ds.MagneticFieldStrength
    nofield = tmp_path / "nofield.dcm"
    ds.save_as(nofield)
    with pytest.raises(InputError, match="MagneticFieldStrength"):
        pipe.run(as_series([nofield]), ctx)
    assumed = Lf2hfPipeline(Lf2hfOptions(assume_field_t=0.064)).run(as_series([nofield]), ctx)
    assert len(assumed) == 1 and "0.064 T" in assumed[0].DerivationDescription
    # Colour images: a clear failure.
    rgb = dcmread(lowfield[0])
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = bytes(rgb.Rows * rgb.Columns * 3)
    colour = tmp_path / "rgb.dcm"
    rgb.save_as(colour)
    with pytest.raises(InputError, match="colour"):
        pipe.run(as_series([colour]), ctx)


def test_max_field_t_moves_the_selector(lowfield: list[Path]) -> None:
    series = as_series(lowfield)  # 0.064 T
    assert Lf2hfPipeline(Lf2hfOptions(max_field_t=0.1)).selects(series).matched
    sel = Lf2hfPipeline(Lf2hfOptions(max_field_t=0.05)).selects(series)
    assert not sel.matched and "not below 0.05 T" in sel.reason


def test_contrast_option_overrides_the_guess(lowfield: list[Path]) -> None:
    ctx, _ = context()
    series = as_series(lowfield[:1])  # "AX T1W SE": auto reads T1w
    auto = Lf2hfPipeline().run(series, ctx)[0]
    told = Lf2hfPipeline(Lf2hfOptions(contrast="T2w")).run(series, ctx)[0]
    assert "T1w input" in auto.DerivationDescription and "T2w input" in told.DerivationDescription
    # The weighting is part of the network's conditioning (or, told a weighting the images do not
    # fit, the gate turns the series away), so the pixels change too.
    assert not np.array_equal(auto.pixel_array, told.pixel_array)


@pytest.mark.parametrize(
    "options",
    [
        {"max_field_t": 0.0},
        {"max_field_t": 3.0},
        {"assume_field_t": 0.001},
        {"assume_field_t": "strong"},
        {"contrast": "PD"},
        {"translate_contrast": "always"},
        {"out_of_domain": "flagged"},
        {"contrast_preserving": "nlm"},
        {"max_residual_to_noise": 0.0},
        {"field_t": 0.064},  # unknown key (a misspelt assume_field_t)
    ],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Lf2hfOptions(**options)  # type: ignore[arg-type]


@pytest.mark.peers
def test_end_to_end_enhanced_series_arrives_in_orthanc(
    lowfield: list[Path], orthanc: Orthanc, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], models=REPO / "exported_models")
    assert storescu(gw.port, lowfield).returncode == 0
    uids = wait_for(lambda: len(orthanc.instance_uids()) >= len(lowfield) and orthanc.instance_uids(), 120,
                    "enhanced series in Orthanc")
    assert len(uids) == len(lowfield)
    (series,) = orthanc.get("/series")
    assert orthanc.get(f"/series/{series}")["MainDicomTags"]["SeriesDescription"].startswith(AI_LABEL)


def _shoulder_series(field_t: float, folder: Path) -> tuple[Series, np.ndarray, np.ndarray]:
    """The real shoulder (pydicom-data MR2_UNCR, validation only) degraded at ``field_t``: series, truth, input."""
    from pipelines.lf2hf.lab.bench import OOD_SEED, ood_degrade, ood_series_file, ood_truth

    truth = ood_truth("MR2_UNCR.dcm")
    y, _ = ood_degrade(truth, field_t, np.random.default_rng([OOD_SEED, int(field_t * 1000)]))
    return as_series([ood_series_file("MR2_UNCR.dcm", y, field_t, folder)]), truth, y


@pytest.mark.parametrize("field_t", [0.064, 0.3, 0.55])
def test_real_shoulder_is_no_worse_than_bicubic_and_keeps_its_contrast(field_t: float, tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    from pipelines.lf2hf.lab.bench import bicubic
    from pipelines.lf2hf.lab.metrics import psnr_masked
    from pipelines.lf2hf.preprocess import head_mask, normalisation_scale

    series, truth, y = _shoulder_series(field_t, tmp_path)
    ctx, flags = context()
    (ds,) = Lf2hfPipeline().run(series, ctx)
    assert ds.SeriesDescription.startswith(LEARNED_PRESERVED_LABEL), ds.SeriesDescription
    assert "unrolled proximal-gradient" in ds.DerivationDescription
    assert "no AI contrast translation" in ds.DerivationDescription
    assert ("out_of_domain", 1) in flags
    truth_n, mask, s_in = truth / normalisation_scale(truth), head_mask(truth), normalisation_scale(y)
    gain = psnr_masked(ds.pixel_array / s_in, truth_n, mask) - psnr_masked(bicubic(y / s_in), truth_n, mask)
    assert gain >= 0.0, f"{field_t} T: {gain:+.2f} dB against bicubic"


def test_gate_never_sends_a_translated_image_of_an_out_of_domain_series(tmp_path: Path) -> None:
    from pipelines.lf2hf.infer import enhance, residual_to_noise

    series, _, y = _shoulder_series(0.3, tmp_path)
    ctx, flags = context()
    (ds,) = Lf2hfPipeline().run(series, ctx)
    # What the network alone would have made of it: brain contrast that the acquisition does not support.
    net = enhance(ctx.sessions["lf2hf-net"], y, 0.3, "T1w")
    assert residual_to_noise(net, y)[0] > 5 * residual_to_noise(ds.pixel_array.astype(np.float32), y)[0]
    assert "AI_ENHANCED" not in ds.ImageType
    # Told to give no result instead: a clear permanent failure, counted, and nothing to send.
    ctx, flags = context()
    with pytest.raises(InputError, match="no result: .*intensity distribution"):
        Lf2hfPipeline(Lf2hfOptions(out_of_domain="no_result")).run(series, ctx)
    assert ("no_result", 1) in flags
    # A body part the model never saw is turned away from its headers alone.
    ds_src = dcmread(series.instances[0].path)
    ds_src.BodyPartExamined = "KNEE"
    knee = tmp_path / "knee.dcm"
    ds_src.save_as(knee)
    (out,) = Lf2hfPipeline().run(as_series([knee]), context()[0])
    assert "body part KNEE" in out.DerivationDescription


def test_translation_off_and_a_brain_stays_consistent(lowfield: list[Path]) -> None:
    from pipelines.lf2hf.infer import residual_to_noise
    from pipelines.lf2hf.preprocess import read_slices

    ctx, flags = context()
    out = Lf2hfPipeline(Lf2hfOptions(translate_contrast="never")).run(as_series(lowfield), ctx)
    assert all(ds.SeriesDescription == f"{LEARNED_PRESERVED_LABEL} (translation off)" for ds in out)
    assert not flags  # a site's choice, not an event
    acquired, _, _ = read_slices(as_series(lowfield))
    for method, label in (("learned", LEARNED_PRESERVED_LABEL), ("tv", PRESERVED_LABEL)):
        if method == "tv":
            out = Lf2hfPipeline(Lf2hfOptions(translate_contrast="never", contrast_preserving="tv")).run(
                as_series(lowfield), ctx)
        assert all(ds.SeriesDescription == f"{label} (translation off)" for ds in out), method
        ratio = residual_to_noise(np.stack([ds.pixel_array.astype(np.float32) for ds in out]), acquired)
        assert np.all(ratio < 1.5), (method, ratio)  # consistent with the acquired k-space to the noise level
        assert np.all(ratio > 0.2), (method, ratio)  # and it did denoise: it is not the zero-filled input
    learned_uids = {ds.SOPInstanceUID for ds in Lf2hfPipeline(Lf2hfOptions(translate_contrast="never")).run(
        as_series(lowfield), ctx)}
    assert learned_uids.isdisjoint({ds.SOPInstanceUID for ds in out})  # two different images never share a UID
