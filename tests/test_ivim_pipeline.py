"""The IVIM pipeline: options, b-value discovery, trace/slice assembly, DICOM outputs, end to end."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import Dataset, dcmread

from gateway.contract import Geometry, Identity, InputError, Instance, RunContext, Series, WarmUpCapable
from gateway.headers import routing_headers
from gateway.uids import derived_uid
from pipelines._derived import DerivedImage, derived_mr_image, derived_mr_images
from pipelines._lab import cpu_session
from pipelines.ivim import dicom as ivim_dicom
from pipelines.ivim.dicom import PARAMETERS, parametric_maps, parametric_maps_by_highdicom
from pipelines.ivim.infer import fit_maps
from pipelines.ivim.lab.synthetic import TISSUES, make_dwi_study
from pipelines.ivim.options import IvimMethod, IvimOptions
from pipelines.ivim.pipeline import IvimPipeline
from pipelines.ivim.preprocess import background_mask, load_dwi
from tests.conftest import REPO, GatewayProcess, Orthanc, need, storescu, wait_for

MODEL_PATH = REPO / "exported_models" / "ivim-net.onnx"


def as_series(paths: list[Path]) -> Series:
    insts = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        insts.append(Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p, routing_headers(ds)))
    return Series(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), "MR", "SCANNER", insts)


def context() -> RunContext:
    return RunContext(
        sessions={"ivim-net": cpu_session(MODEL_PATH)},
        uid=lambda key: derived_uid("test-ivim", key),
        identity=Identity("aigw tests", "aigw", "0.0-test", "TEST-1"),
        workdir=Path("."),
        model_versions={"ivim-net": "test"},
    )


def test_options_default_to_the_documented_values() -> None:
    options = IvimPipeline().options
    assert options == IvimOptions(
        method="net", derived_series=True, uncertainty=True, mask_fraction=0.08, min_bvalues=4
    )
    assert IvimOptions.model_validate({"method": "lsq-full"}).method == "lsq-full"


@pytest.mark.parametrize(
    "table",
    [
        {"method": "bayes"},
        {"mask_fraction": -0.1},
        {"mask_fraction": 1.5},
        {"min_bvalues": 3},
        {"min_bvalues": "many"},
        {"derived_series": "sometimes"},
        {"uncertainty": "maybe"},
    ],
)
def test_bad_option_values_are_refused(table: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        IvimOptions.model_validate(table)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        IvimOptions.model_validate({"methods": "net"})
    with pytest.raises(ValidationError):
        IvimOptions(min_b_values=5)  # type: ignore[call-arg]


def test_min_bvalues_option_changes_what_the_selector_takes(tmp_path: Path) -> None:
    series = as_series(make_dwi_study(tmp_path, seed=2, size=16, slices=1).paths)  # 9 b-values
    assert IvimPipeline().selects(series).matched
    assert IvimPipeline(IvimOptions(min_bvalues=9)).selects(series).matched
    sel = IvimPipeline(IvimOptions(min_bvalues=10)).selects(series)
    assert not sel.matched and "at least 10" in sel.reason


def test_derived_series_and_mask_fraction_options_change_what_run_sends(tmp_path: Path) -> None:
    series = as_series(make_dwi_study(tmp_path, seed=7, size=24, slices=2).paths)
    full = IvimPipeline(IvimOptions(method="lsq-segmented")).run(series, context())
    maps_only = IvimPipeline(IvimOptions(method="lsq-segmented", derived_series=False)).run(series, context())
    assert len(full) == 4 + 4 * 2 and len(maps_only) == 4
    assert {ds.SOPClassUID for ds in maps_only} == {PM_SOP_CLASS}
    assert all("lsq-segmented" in ds.SeriesDescription for ds in full)

    def fitted(out: list[Dataset]) -> int:
        return sum(int(np.count_nonzero(ds.pixel_array)) for ds in out if ds.SOPClassUID == PM_SOP_CLASS)

    strict = IvimPipeline(IvimOptions(method="lsq-segmented", mask_fraction=0.9, derived_series=False))
    assert 0 < fitted(strict.run(series, context())) < fitted(maps_only)


def test_uncertainty_option_adds_standard_deviation_maps_for_the_net(tmp_path: Path) -> None:
    series = as_series(make_dwi_study(tmp_path, seed=7, size=24, slices=2).paths)

    def labels(out: list[Dataset]) -> list[str]:
        return sorted(str(ds.SeriesDescription).split()[1] for ds in out)

    with_sd = IvimPipeline(IvimOptions(method="net")).run(series, context())
    without = IvimPipeline(IvimOptions(method="net", uncertainty=False)).run(series, context())
    # Seven maps (four parameters, three standard deviations), each as a PM and a derived MR series.
    assert len(with_sd) == 7 + 7 * 2 and len(without) == 4 + 4 * 2
    assert labels([ds for ds in with_sd if ds.SOPClassUID == PM_SOP_CLASS]) == SD_LABELS
    assert {str(ds.SeriesDescription).split()[1] for ds in without} == {"D", "DSTAR", "F", "S0"}
    # The least-squares fits give no standard deviation: the option changes nothing there.
    lsq = IvimPipeline(IvimOptions(method="lsq-segmented", derived_series=False)).run(series, context())
    assert labels(lsq) == ["D", "DSTAR", "F", "S0"]


def test_warm_up_loads_highdicoms_standard_tables_before_any_job() -> None:
    from highdicom import _standard_utils

    loader = _standard_utils.get_module_attribute_map
    loader.cache_clear()
    pipeline = IvimPipeline()
    assert isinstance(pipeline, WarmUpCapable)
    pipeline.warm_up()
    assert loader.cache_info().currsize == 1  # the first Parametric Map no longer reads it


@pytest.mark.parametrize("vendor", ["standard", "siemens", "ge", "philips"])
def test_bvalues_found_wherever_the_vendor_writes_them(tmp_path: Path, vendor: str) -> None:
    study = make_dwi_study(tmp_path, seed=2, size=32, slices=2, vendor=vendor)
    series = as_series(study.paths)
    sel = IvimPipeline().selects(series)
    assert sel.matched, sel.reason
    vol = load_dwi(series)
    assert list(vol.bvalues) == list(study.bvalues)
    assert vol.signals.shape == (2, len(study.bvalues), 32, 32)


def test_series_without_bvalues_is_not_selected_and_fails_cleanly(tmp_path: Path) -> None:
    series = as_series(make_dwi_study(tmp_path, seed=3, size=16, slices=1, vendor="none").paths)
    sel = IvimPipeline().selects(series)
    assert not sel.matched and "0 distinct b-value" in sel.reason
    with pytest.raises(InputError, match="no b-value found"):
        IvimPipeline().run(series, context())


def test_too_few_bvalues_is_an_input_error(tmp_path: Path) -> None:
    series = as_series(make_dwi_study(tmp_path, seed=4, size=16, slices=1, bvalues=(0, 500, 1000)).paths)
    assert not IvimPipeline().selects(series).matched
    with pytest.raises(InputError, match="at least 4 distinct b-values"):
        IvimPipeline().run(series, context())


def test_enhanced_and_classic_give_the_same_volume(tmp_path: Path) -> None:
    classic = load_dwi(as_series(make_dwi_study(tmp_path / "c", seed=5, size=24, slices=3).paths))
    enhanced = load_dwi(as_series(make_dwi_study(tmp_path / "e", seed=5, size=24, slices=3, enhanced=True).paths))
    assert enhanced.enhanced and not classic.enhanced
    assert np.allclose(classic.signals, enhanced.signals)
    assert [g.position for g in classic.geometry] == [g.position for g in enhanced.geometry]


PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
#: LUT labels of the network's maps: four parameters and three standard deviations.
SD_LABELS = ["D", "DSTAR", "DSTAR_SD", "D_SD", "F", "F_SD", "S0"]


def displayed(stored: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Grey levels 0-255 a viewer shows from stored values and a linear window alone.

    No Modality LUT is applied: the MR Image IOD has none, so a conforming viewer
    ignores any rescale in an MR image. LINEAR_EXACT (PS3.3 C.11.2.1.3).
    """
    lo = centre - width / 2
    return np.clip((stored.astype(np.float64) - lo) / width * 255.0, 0, 255)


def assert_readable(grey: np.ndarray, tissue: np.ndarray, what: str) -> None:
    """Neither blank nor saturated over the tissue, with a spread of grey levels."""
    shown = grey[tissue]
    assert np.mean(shown >= 254.5) < 0.5, f"{what}: {np.mean(shown >= 254.5):.0%} of the tissue is white"
    assert np.mean(shown <= 0.5) < 0.5, f"{what}: {np.mean(shown <= 0.5):.0%} of the tissue is black"
    assert len(np.unique(np.round(shown))) >= 16, f"{what}: only {len(np.unique(np.round(shown)))} grey levels"


def _group(ds: Dataset, item: Dataset, keyword: str) -> Dataset:
    """A functional group macro of one frame, per-frame first, then shared (PS3.3 C.7.6.16)."""
    if keyword in item:
        return item[keyword][0]
    return ds.SharedFunctionalGroupsSequence[0][keyword][0]


def pm_frames(out: list[Dataset]) -> list[tuple[str, float, np.ndarray, float, float]]:
    """(parameter label, z position, frame, window centre, width) of every Parametric Map frame."""
    frames = []
    for ds in out:
        if ds.SOPClassUID != PM_SOP_CLASS:
            continue
        pixels = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
        for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
            label = _group(ds, item, "RealWorldValueMappingSequence").LUTLabel
            z = float(_group(ds, item, "PlanePositionSequence").ImagePositionPatient[2])
            voi = _group(ds, item, "FrameVOILUTSequence")
            frames.append((str(label), z, frame, float(voi.WindowCenter), float(voi.WindowWidth)))
    return frames


@pytest.fixture(scope="module")
def maps_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[Dataset]]:
    study = make_dwi_study(tmp_path_factory.mktemp("ivim") / "in", seed=6, size=64, slices=3, snr=60)
    return study, IvimPipeline().run(as_series(study.paths), context())


def _slice_of(study: Any, z: float) -> int:
    zs = [round(float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), 2) for p in study.paths]
    return sorted(set(zs)).index(round(z, 2))


def test_every_parameter_map_is_readable_through_its_own_window(maps_study: tuple[Any, list[Dataset]]) -> None:
    study, out = maps_study
    frames = pm_frames(out)
    assert sorted({label for label, *_ in frames}) == SD_LABELS
    for label, z, frame, centre, width in frames:
        tissue = (study.labels[_slice_of(study, z)] > 0) & (frame > 0)
        assert_readable(displayed(frame, centre, width), tissue, f"Parametric Map {label} at z={z:g}")


def test_every_map_frame_has_its_own_dimension_index_and_the_maps_load_as_volumes(
    maps_study: tuple[Any, list[Dataset]],
) -> None:
    # PS3.3 C.7.6.17: the dimension index values must identify each frame.
    for ds in (ds for ds in maps_study[1] if ds.SOPClassUID == PM_SOP_CLASS):
        indices = [str(it.FrameContentSequence[0].DimensionIndexValues) for it in ds.PerFrameFunctionalGroupsSequence]
        assert len(set(indices)) == len(indices), ds.SeriesDescription
        assert hd.pm.ParametricMap.from_dataset(ds).get_volume().shape[0] == 3


def test_no_empty_laterality_when_the_source_has_none(maps_study: tuple[Any, list[Dataset]]) -> None:
    # General Series Laterality is type 2C: only for paired body parts (PS3.3 C.7.3.1).
    assert "Laterality" not in dcmread(maps_study[0].paths[0], stop_before_pixels=True)
    for ds in maps_study[1]:
        assert "Laterality" not in ds, ds.SeriesDescription


def test_derived_mr_images_have_no_modality_lut_and_read_from_stored_values(
    maps_study: tuple[Any, list[Dataset]],
) -> None:
    study, out = maps_study
    real = {(label, round(z, 2)): frame for label, z, frame, *_ in pm_frames(out)}
    derived = [ds for ds in out if ds.SOPClassUID != PM_SOP_CLASS]
    assert len(derived) == 7 * 3  # one MR series per map, one image per slice
    for ds in derived:
        label, z = ds.ImageType[3], float(ds.ImagePositionPatient[2])
        # The MR Image IOD (PS3.3 A.4) has no Modality LUT.
        assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds and "RescaleType" not in ds
        assert ds.ImageType[:3] == ["DERIVED", "SECONDARY", "DIFFUSION MAP"]  # PS3.3 C.8.3.1.1.1
        tissue = (study.labels[_slice_of(study, z)] > 0) & (ds.pixel_array > 0)
        grey = displayed(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth))
        assert_readable(grey, tissue, f"derived MR {label} at z={z:g}")
        truth = real[(label, round(z, 2))]
        if label == "S0":
            assert "RealWorldValueMappingSequence" not in ds  # arbitrary units of the source
            assert np.allclose(ds.pixel_array, np.clip(np.rint(truth), 0, 65535))
            continue
        # A fixed scale, named in the description and stated as a Real World Value Mapping.
        rwvm = ds.RealWorldValueMappingSequence[0]
        slope = float(rwvm.RealWorldValueSlope)
        # A standard deviation is stored in its parameter's scale.
        scale, unit = {"D": (1e-6, "1e-6 mm2/s"), "DSTAR": (1e-5, "1e-5 mm2/s"), "F": (1e-4, "1e-4")}[
            label.removesuffix("_SD")
        ]
        assert slope == scale and float(rwvm.RealWorldValueIntercept) == 0
        assert f"[{unit}]" in ds.SeriesDescription
        derivations = [
            str(it.ConceptCodeSequence[0].CodeValue)
            for it in rwvm.QuantityDefinitionSequence
            if it.ConceptNameCodeSequence[0].CodeValue == "121401"
        ]
        assert derivations == (["386136009"] if label.endswith("_SD") else []), label
        assert np.abs(ds.pixel_array * slope - truth).max() <= 0.51 * slope  # rounding, float32 maps


def test_derived_images_declare_the_character_set_of_the_text_they_copy(
    maps_study: tuple[Any, list[Dataset]], tmp_path: Path
) -> None:
    # PS3.3 C.12.1.1.2: copied Patient's Name keeps its meaning only with its character set.
    src = dcmread(maps_study[0].paths[0])
    src.SpecificCharacterSet = "ISO_IR 192"
    src.PatientName = "Иванов^Иван"
    out = [ds for ds in IvimPipeline().run(as_series(maps_study[0].paths), context()) if ds.Modality == "MR"]
    img = derived_mr_image(src, context(), _derived_image_like(out[0]))
    img.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    back = dcmread(tmp_path / "mr.dcm")
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Иванов^Иван"


def _derived_image_like(ds: Dataset) -> DerivedImage:
    return DerivedImage(
        series_uid=ds.SeriesInstanceUID,
        sop_uid=ds.SOPInstanceUID,
        series_number=int(ds.SeriesNumber),
        instance_number=1,
        description="x",
        image_type=("DIFFUSION MAP", "D"),
        derivation=hd.sr.CodedConcept("129105", "DCM", "Diffusion image analysis"),
        derivation_description="x",
        pixels=ds.pixel_array,
        geometry=Geometry(
            tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
            tuple(float(v) for v in ds.ImageOrientationPatient),  # type: ignore[arg-type]
            (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            None,
        ),
        window=(1.0, 2.0),
    )


@pytest.mark.parametrize("method", ["net", "lsq-segmented"])
def test_maps_are_accurate_valid_and_reference_their_sources(tmp_path: Path, method: IvimMethod) -> None:
    study = make_dwi_study(tmp_path / "in", seed=6, size=64, slices=3, snr=60)
    series = as_series(study.paths)
    out = IvimPipeline(IvimOptions(method=method)).run(series, context())
    pms = [ds for ds in out if ds.SOPClassUID == PM_SOP_CLASS]
    maps = 7 if method == "net" else 4  # the net adds the standard deviations of D, D*, f
    assert len(pms) == maps, "one Parametric Map per parameter and standard deviation"
    assert len({ds.SeriesInstanceUID for ds in out}) == 2 * maps
    source_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.paths}
    by_label: dict[str, hd.pm.ParametricMap] = {}
    for i, pm in enumerate(pms):
        path = tmp_path / f"pm{i}.dcm"
        pm.save_as(path, enforce_file_format=True)
        back = hd.pm.ParametricMap.from_dataset(dcmread(path))
        assert back.FrameOfReferenceUID == dcmread(study.paths[0]).FrameOfReferenceUID
        assert int(back.NumberOfFrames) == 3
        refs = {r.ReferencedSOPInstanceUID for r in back.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert refs <= source_uids and refs
        by_label[back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel] = back
        _dciodvfy_clean(path)
    assert sorted(by_label) == (SD_LABELS if method == "net" else ["D", "DSTAR", "F", "S0"])
    quantities = {label: _quantity(pm) for label, pm in by_label.items()}
    assert quantities["D"] == ("113291", None, "mm2/s")
    assert quantities["DSTAR"] == ("113292", None, "mm2/s")
    assert quantities["F"] == ("113293", None, "1")
    if method == "net":
        # Same quantity and unit, modified by Derivation = Standard Deviation (SCT 386136009).
        assert quantities["D_SD"] == ("113291", "386136009", "mm2/s")
        assert quantities["DSTAR_SD"] == ("113292", "386136009", "mm2/s")
        assert quantities["F_SD"] == ("113293", "386136009", "1")

    # Accuracy in the liver (large homogeneous organ) against the phantom truth.
    liver = study.labels == list(TISSUES).index("liver")
    d_map = np.zeros(liver.shape, np.float32)
    for label, z, frame, *_ in pm_frames(out):
        if label == "D":
            d_map[_slice_of(study, z)] = frame
    d_true = TISSUES["liver"][0]
    assert abs(np.median(d_map[liver]) - d_true) / d_true < 0.15
    mr = tmp_path / "mr.dcm"
    next(ds for ds in out if ds.SOPClassUID != PM_SOP_CLASS).save_as(mr, enforce_file_format=True)
    _dciodvfy_clean(mr)


def _quantity(pm: Dataset) -> tuple[str, str | None, str]:
    """(quantity code, derivation code or None, UCUM unit) of a map's Real World Value Mapping."""
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    items = {str(it.ConceptNameCodeSequence[0].CodeValue): it for it in rwvm.QuantityDefinitionSequence}
    quantity = str(items["246205007"].ConceptCodeSequence[0].CodeValue)  # SCT Quantity
    derivation = items.get("121401")  # DCM Derivation
    code = str(derivation.ConceptCodeSequence[0].CodeValue) if derivation is not None else None
    return quantity, code, str(rwvm.MeasurementUnitsCodeSequence[0].CodeValue)


def test_standard_deviation_maps_are_plausible_in_the_liver(maps_study: tuple[Any, list[Dataset]]) -> None:
    study, out = maps_study
    liver = study.labels == list(TISSUES).index("liver")
    vol: dict[str, np.ndarray] = {}
    for label, z, frame, *_ in pm_frames(out):
        vol.setdefault(label, np.zeros(liver.shape, np.float32))[_slice_of(study, z)] = frame
    d_true, f_true, dstar_true = TISSUES["liver"][:3]
    for label, truth in (("D", d_true), ("F", f_true), ("DSTAR", dstar_true)):
        sd = vol[f"{label}_SD"][liver]
        assert np.all(sd > 0), label
        # An uncertainty, not a copy of the estimate: smaller than the value, larger than float noise.
        assert 1e-3 * truth < np.median(sd) < truth, (label, float(np.median(sd)), truth)
    # At SNR 60 on eleven b-values D is known far better than D* (relative to its value).
    assert np.median(vol["D_SD"][liver]) / d_true < np.median(vol["DSTAR_SD"][liver]) / dstar_true


def _dciodvfy_clean(path: Path) -> None:
    r = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


@pytest.mark.peers
def test_end_to_end_maps_arrive_in_orthanc(
    tmp_path: Path, orthanc: Orthanc, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], models=REPO / "exported_models")
    study = make_dwi_study(tmp_path / "in", seed=8, size=48, slices=2)
    assert storescu(gw.port, study.paths).returncode == 0
    # Seven Parametric Maps (D, D*, f, S0 and the standard deviations of D, D*, f)
    # and seven derived MR series of two slices.
    uids = wait_for(
        lambda: len(orthanc.instance_uids()) >= 7 + 7 * 2 and orthanc.instance_uids(), 120, "IVIM results in Orthanc"
    )
    assert len(uids) == 21
    series = [orthanc.get(f"/series/{s}")["MainDicomTags"] for s in orthanc.get("/series")]
    modalities = sorted(tags.get("Modality", "") for tags in series)
    assert modalities.count("MR") == 7 and len(modalities) == 14
    described = {str(tags.get("SeriesDescription", "")).split()[1] for tags in series}
    assert {"D_SD", "DSTAR_SD", "F_SD"} <= described


# Parametric Maps built once per series (issue 15: the maps at PACS within the quiet period + 3 s).

#: Set by highdicom when it builds an object, so they differ between any two builds of one map.
_CREATION_TIMES = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


def _round_trip(ds: Dataset) -> Dataset:
    """``ds`` as a receiver reads it from its file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def _as_received(ds: Dataset) -> Dataset:
    """``ds`` as a receiver reads it from its file, less the date and time it was built."""
    back = _round_trip(ds)
    for keyword in _CREATION_TIMES:
        if keyword in back:
            delattr(back, keyword)
    for item in back.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return back


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
def test_every_parametric_map_equals_the_one_highdicom_builds_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enhanced: bool, descending: bool
) -> None:
    study = make_dwi_study(tmp_path / "in", seed=9, size=24, slices=3, directions=2, enhanced=enhanced)
    volume = load_dwi(as_series(study.paths))
    if descending:
        # Slices given from head to feet: highdicom sorts the frames, and every map must follow it.
        volume = dataclasses.replace(
            volume, signals=volume.signals[::-1], geometry=volume.geometry[::-1], sources=volume.sources[::-1]
        )
    ctx = context()
    maps = fit_maps(volume, background_mask(volume, 0.08), "net", ctx, uncertainty=True)
    lookup = ivim_dicom._standard_utils.is_attribute_in_iod
    built = 0
    construct = hd.pm.ParametricMap.__init__

    def counted(self: hd.pm.ParametricMap, *args: Any, **kwargs: Any) -> None:
        nonlocal built
        built += 1
        construct(self, *args, **kwargs)

    monkeypatch.setattr(hd.pm.ParametricMap, "__init__", counted)
    ours = parametric_maps(volume, maps, ctx, "test")
    assert built == 1, "highdicom's constructor runs once per series, not once per map"
    assert ivim_dicom._standard_utils.is_attribute_in_iod is lookup, "highdicom's own look-up is restored"
    # The reference: each map built by highdicom, without the cached IOD look-ups.
    theirs = parametric_maps_by_highdicom(volume, maps, ctx, "test")
    assert len(ours) == len(theirs) == 7
    frames = [frame for _, _, frame, *_ in pm_frames(ours)]
    assert len(frames) == 7 * 3 and all(f.shape == (24, 24) for f in frames)
    for mine, reference in zip(ours, theirs):
        a, b = _as_received(mine), _as_received(reference)
        assert a.file_meta == b.file_meta
        differing = sorted(
            {e.keyword for e in a if e.tag not in b or b[e.tag] != e} | {e.keyword for e in b if e.tag not in a}
        )
        assert not differing, (a.SeriesDescription, differing)
        assert a == b


def test_derived_mr_images_of_one_slice_equal_each_one_built_alone(maps_study: tuple[Any, list[Dataset]]) -> None:
    src = dcmread(maps_study[0].paths[0])
    src.SpecificCharacterSet = "ISO_IR 192"  # copied text must keep its bytes and its meaning
    src.PatientName = "Иванов^Иван"
    first_slice = [ds for ds in maps_study[1] if ds.Modality == "MR" and int(ds.InstanceNumber) == 1]
    images = [_derived_image_like(ds) for ds in first_slice]
    images[0] = dataclasses.replace(images[0], scale=PARAMETERS[0].scale(), comments="quality: fine")
    images[1] = dataclasses.replace(images[1], description="another series", window=(100.0, 0.5))
    ctx = context()
    together = derived_mr_images(src, ctx, images)
    assert len(together) == len(images) == 7
    for mine, img in zip(together, images):
        a, b = _round_trip(mine), _round_trip(derived_mr_image(src, ctx, img))
        assert a.file_meta == b.file_meta
        assert a == b, a.SeriesDescription
        assert str(a.PatientName) == "Иванов^Иван"
    moved = dataclasses.replace(images[1], geometry=dataclasses.replace(images[1].geometry, position=(0.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match="same geometry"):
        derived_mr_images(src, ctx, [images[0], moved])
