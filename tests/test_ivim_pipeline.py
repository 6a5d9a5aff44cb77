"""The IVIM pipeline: b-value discovery, trace/slice assembly, DICOM outputs, end to end."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from gateway.contract import Identity, InputError, Instance, RunContext, Series
from gateway.headers import routing_headers
from gateway.uids import derived_uid
from pipelines.ivim.fit import make_session
from pipelines.ivim.pipeline import IvimPipeline
from pipelines.ivim.preprocess import load_dwi
from pipelines.ivim.synthetic import TISSUES, make_dwi_study
from tests.conftest import REPO, GatewayProcess, Orthanc, need, storescu, wait_for

MODEL_PATH = REPO / "exported_models" / "ivim-net.onnx"


def as_series(paths: list[Path]) -> Series:
    insts = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        insts.append(Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p, routing_headers(ds)))
    return Series(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), "MR", "SCANNER", insts)


def context(method: str = "net", **options: object) -> RunContext:
    return RunContext(
        sessions={"ivim-net": make_session(MODEL_PATH)},
        uid=lambda key: derived_uid("test-ivim", key),
        identity=Identity("aigw tests", "aigw", "0.0-test", "TEST-1"),
        workdir=Path("."),
        options={"method": method, **options},
        model_versions={"ivim-net": "test"},
    )


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


@pytest.mark.parametrize("method", ["net", "lsq-segmented"])
def test_maps_are_accurate_valid_and_reference_their_sources(tmp_path: Path, method: str) -> None:
    study = make_dwi_study(tmp_path / "in", seed=6, size=64, slices=3, snr=60)
    series = as_series(study.paths)
    out = IvimPipeline().run(series, context(method))
    pm, derived = out[0], out[1:]
    assert len(derived) == 4 * 3  # one MR series per parameter, one image per slice
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    pm_back = hd.pm.ParametricMap.from_dataset(dcmread(path))
    assert pm_back.FrameOfReferenceUID == dcmread(study.paths[0]).FrameOfReferenceUID
    assert int(pm_back.NumberOfFrames) == 3 * 4
    refs = {r.ReferencedSOPInstanceUID for r in pm_back.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.paths} and refs
    labels = {it.RealWorldValueMappingSequence[0].LUTLabel for it in pm_back.PerFrameFunctionalGroupsSequence}
    assert labels == {"D", "DSTAR", "F", "S0"}
    codes = {
        it.RealWorldValueMappingSequence[0].QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue
        for it in pm_back.PerFrameFunctionalGroupsSequence
    }
    assert {"113291", "113292", "113293"} <= codes
    _dciodvfy_clean(path)
    mr = tmp_path / "mr.dcm"
    derived[0].save_as(mr, enforce_file_format=True)
    _dciodvfy_clean(mr)

    # Accuracy in the liver (large homogeneous organ) against the phantom truth.
    vol = load_dwi(series)
    liver = study.labels == list(TISSUES).index("liver")
    d_map = np.zeros(liver.shape, np.float32)
    for it, frame in zip(pm_back.PerFrameFunctionalGroupsSequence, pm_back.pixel_array):
        if it.RealWorldValueMappingSequence[0].LUTLabel == "D":
            z = [round(g.position[2], 2) for g in vol.geometry].index(
                round(float(it.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
            )
            d_map[z] = frame
    d_true = TISSUES["liver"][0]
    assert abs(np.median(d_map[liver]) - d_true) / d_true < 0.15


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
    uids = wait_for(
        lambda: len(orthanc.instance_uids()) >= 1 + 4 * 2 and orthanc.instance_uids(), 120, "IVIM results in Orthanc"
    )
    assert len(uids) == 9
    modalities = sorted(
        orthanc.get(f"/series/{s}")["MainDicomTags"].get("Modality", "") for s in orthanc.get("/series")
    )
    assert modalities.count("MR") == 4 and len(modalities) == 5
