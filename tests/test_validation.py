"""Every DICOM output of every pipeline, judged by dciodvfy, PixelMed and a highdicom read-back.

Each pipeline runs once per module on a small synthetic input, as its own tests
run it. Every dataset ``run()`` returns is written to disk and classified by
its SOP Class, so a pipeline may return more or fewer objects of a class
without this file changing. The test of an output type fails with every error
the three tools report on it, less the allow-list of :mod:`tests.validators`;
the full report of each pipeline is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID, Comprehensive3DSRStorage, MRImageStorage, ParametricMapStorage, SegmentationStorage

from gateway.contract import Identity, Instance, Pipeline, RunContext, Series
from gateway.headers import routing_headers
from gateway.uids import derived_uid
from tests.conftest import REPO, save_all
from tests.validators import ALLOW_LIST, PixelMed, Report, Tool, allowance_for, validate

MODELS = REPO / "exported_models"
IDENTITY = Identity("aigw tests", "aigw", "0.0-test", "TEST-1")

# (pipeline, SOP Class of an output, whether PixelMed has rules for it)
OUTPUT_TYPES = [
    ("ivim", ParametricMapStorage, False),
    ("ivim", MRImageStorage, False),
    ("lf2hf", MRImageStorage, False),
    ("wsi-mil", SegmentationStorage, True),
    ("wsi-mil", Comprehensive3DSRStorage, True),
]


def _series(paths: Sequence[Path]) -> Series:
    insts = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        insts.append(Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p, routing_headers(ds)))
    first = dcmread(paths[0], stop_before_pixels=True)
    return Series(str(first.SeriesInstanceUID), str(first.StudyInstanceUID), str(first.Modality), "SCANNER", insts)


def _run(pipeline: Pipeline, inputs: Sequence[Path], folder: Path, make_session: Callable[[Path], Any]) -> list[Path]:
    """Run ``pipeline`` on the input series and write every dataset it returns into ``folder``."""
    series = _series(inputs)
    selection = pipeline.selects(series)
    assert selection.matched, selection.reason
    models = pipeline.models()
    ctx = RunContext(
        sessions={m.name: make_session(MODELS / f"{m.name}.onnx") for m in models},
        uid=lambda key: derived_uid(f"test-validation-{pipeline.name}", key),
        identity=IDENTITY,
        workdir=folder / "work",
        model_versions={m.name: "test" for m in models},
    )
    ctx.workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    out: Sequence[Dataset] = pipeline.run(series, ctx)
    print(f"{pipeline.name}: {len(out)} dataset(s) in {time.perf_counter() - t0:.1f} s")
    return save_all(out, folder, f"{pipeline.name}-")


# --------------------------------------------------------------------------- outputs, once per module


@pytest.fixture(scope="module")
def pixelmed() -> Iterator[PixelMed]:
    # Opened before the pipelines run (every output fixture asks for it first):
    # its validators compile their rules meanwhile.
    with PixelMed() as session:
        yield session


@pytest.fixture(scope="module")
def ivim_outputs(pixelmed: PixelMed, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from pipelines._lab import cpu_session
    from pipelines.ivim.lab.synthetic import make_dwi_study
    from pipelines.ivim.options import IvimOptions
    from pipelines.ivim.pipeline import IvimPipeline

    folder = tmp_path_factory.mktemp("ivim")
    study = make_dwi_study(folder / "in", seed=6, size=32, slices=2)
    return _run(IvimPipeline(IvimOptions(method="net")), study.paths, folder, cpu_session)


@pytest.fixture(scope="module")
def lf2hf_outputs(pixelmed: PixelMed, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from pipelines._lab import cpu_session
    from pipelines.lf2hf.lab.synthetic import write_lowfield_series
    from pipelines.lf2hf.pipeline import Lf2hfPipeline

    folder = tmp_path_factory.mktemp("lf2hf")
    inputs = write_lowfield_series(folder / "in", seed=11, matrix=(48, 40), slices=(80, 90))
    return _run(Lf2hfPipeline(), inputs, folder, cpu_session)


@pytest.fixture(scope="module")
def wsimil_outputs(pixelmed: PixelMed, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from pipelines._lab import cpu_session
    from pipelines.wsimil.lab.scene import SlideScene
    from pipelines.wsimil.lab.wsi import write_slide
    from pipelines.wsimil.pipeline import WsiMilPipeline

    folder = tmp_path_factory.mktemp("wsimil")
    files = write_slide(SlideScene(5, 1600.0, 1200.0, tumour=True), folder / "in", base_mpp=1.0, tile=256)
    return _run(WsiMilPipeline(), files.paths, folder, cpu_session)


def _report(name: str, paths: list[Path], pixelmed: PixelMed) -> Report:
    t0 = time.perf_counter()
    report = validate(paths, pixelmed)
    print(f"{name}: {len(paths)} file(s) validated in {time.perf_counter() - t0:.1f} s\n{report.text()}")
    return report


@pytest.fixture(scope="module")
def ivim_report(ivim_outputs: list[Path], pixelmed: PixelMed) -> Report:
    return _report("ivim", ivim_outputs, pixelmed)


@pytest.fixture(scope="module")
def lf2hf_report(lf2hf_outputs: list[Path], pixelmed: PixelMed) -> Report:
    return _report("lf2hf", lf2hf_outputs, pixelmed)


@pytest.fixture(scope="module")
def wsimil_report(wsimil_outputs: list[Path], pixelmed: PixelMed) -> Report:
    return _report("wsi-mil", wsimil_outputs, pixelmed)


def _pipeline_report(request: pytest.FixtureRequest, pipeline: str) -> Report:
    report: Report = request.getfixturevalue(f"{pipeline.replace('-', '')}_report")
    return report


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    ("pipeline", "sop_class", "pixelmed_judges"),
    OUTPUT_TYPES,
    ids=[f"{p}-{s.name.removesuffix(' Storage').replace(' ', '')}" for p, s, _ in OUTPUT_TYPES],
)
def test_output_passes_all_three_validators(
    request: pytest.FixtureRequest, pipeline: str, sop_class: UID, pixelmed_judges: bool
) -> None:
    report = _pipeline_report(request, pipeline).select(lambda f: f.sop_class_uid == sop_class)
    assert report.files, f"{pipeline} returned no {sop_class.name}"
    for f in report.files:
        # each tool really looked at the file: none skipped it unnoticed
        assert f.findings[Tool.DCIODVFY].notes or f.findings[Tool.DCIODVFY].errors, f"dciodvfy said nothing: {f}"
        assert f.findings[Tool.HIGHDICOM].judged, f.findings[Tool.HIGHDICOM].notes
        assert f.findings[Tool.PIXELMED].judged is pixelmed_judges, f.findings[Tool.PIXELMED].notes
    report.check()


@pytest.mark.parametrize("pipeline", sorted({p for p, _, _ in OUTPUT_TYPES}))
def test_every_output_type_is_listed(request: pytest.FixtureRequest, pipeline: str) -> None:
    listed = {s for p, s, _ in OUTPUT_TYPES if p == pipeline}
    returned = {f.sop_class_uid for f in _pipeline_report(request, pipeline).files}
    assert returned <= listed, f"{pipeline} returns {returned - listed}: add them to OUTPUT_TYPES"


# --------------------------------------------------------------------------- the allow-list stays tight


def test_every_allowance_cites_the_standard_and_compiles() -> None:
    for a in ALLOW_LIST:
        re.compile(a.pattern)
        assert re.search(r"PS3\.(3|16) ", a.clause), a.clause
        assert a.reason


def _sr(*groups: list[tuple[str, str]], procedure: Dataset | None = None) -> Dataset:
    """A TID 1500-shaped tree: root, Procedure reported, then Imaging Measurements holding ``groups``."""

    def item(value_type: str, code: str, children: Sequence[Dataset] = ()) -> Dataset:
        it = Dataset()
        it.ValueType = value_type
        name = Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = code, "DCM", code
        it.ConceptNameCodeSequence = [name]
        if children:
            it.ContentSequence = list(children)
        return it

    measurements = item("CONTAINER", "126010", [item("CONTAINER", "125007", [item(*c) for c in g]) for g in groups])
    root = item("CONTAINER", "126000", [procedure or item("CODE", "121058"), measurements])
    return root


_TID1411_ROW7 = (
    'Error: Template 1411 VolumetricROIMeasurements/[Row 1] CONTAINER (125007,DCM,"Measurement Group")/[Row 7] '
    'IMAGE (121191,DCM,"Referenced Segment"): within 1.2.1: /CONTAINER (126000,DCM,"Imaging Measurement Report")'
    '/CONTAINER (126010,DCM,"Imaging Measurements")/CONTAINER (125007,DCM,"Measurement Group"): '
    "Missing conditional content item"
)
_CID100 = (
    'Error: Template 1500 MeasurementReport/[Row 1] CONTAINER CID 7021/[Row 4] CODE (121058,DCM,"Procedure '
    'reported"): 1.1: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CODE (121058,DCM,"Procedure reported"): '
    'Code (252416005,SCT,"Histopathology") not found in context group 100'
)


def test_tid1411_on_a_group_is_allowed_only_for_a_group_without_a_region() -> None:
    assert allowance_for(Tool.PIXELMED, _TID1411_ROW7, _sr([("NUM", "111047")])) is not None
    with_segment = _sr([("NUM", "42798000"), ("IMAGE", "121191")])
    assert allowance_for(Tool.PIXELMED, _TID1411_ROW7, with_segment) is None
    assert allowance_for(Tool.PIXELMED, _TID1411_ROW7, Dataset()) is None


def test_a_code_outside_cid_100_is_allowed_only_when_the_extension_is_declared() -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "252416005", "SCT", "Histopathology"
    procedure = Dataset()
    procedure.ValueType = "CODE"
    procedure.ConceptCodeSequence = [code]
    assert allowance_for(Tool.PIXELMED, _CID100, _sr(procedure=procedure)) is None
    code.ContextIdentifier, code.ContextGroupExtensionFlag = "100", "Y"
    code.ContextGroupExtensionCreatorUID = "2.25.1"
    assert allowance_for(Tool.PIXELMED, _CID100, _sr(procedure=procedure)) is not None
    assert allowance_for(Tool.DCIODVFY, _CID100, _sr(procedure=procedure)) is None


def test_missing_laterality_is_allowed_only_without_a_body_part() -> None:
    message = "Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute"
    ds = Dataset()
    assert allowance_for(Tool.PIXELMED, message, ds) is not None
    ds.BodyPartExamined = "BREAST"
    assert allowance_for(Tool.PIXELMED, message, ds) is None


def test_shared_derivation_image_is_allowed_only_when_every_frame_has_it() -> None:
    message = (
        "Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item[1]/: "
        "Missing required sequence attribute (Type 2)"
    )
    with_it, without = Dataset(), Dataset()
    with_it.DerivationImageSequence = []
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    ds.PerFrameFunctionalGroupsSequence = [with_it, with_it]
    assert allowance_for(Tool.PIXELMED, message, ds) is not None
    ds.PerFrameFunctionalGroupsSequence = [with_it, without]
    assert allowance_for(Tool.PIXELMED, message, ds) is None


def test_highdicom_frame_access_failure_is_allowed_only_for_float_pixels() -> None:
    message = "get_frame(1): AttributeError: 'ParametricMap' object has no attribute 'PixelRepresentation'"
    ds = Dataset()
    ds.BitsAllocated = 32
    assert allowance_for(Tool.HIGHDICOM, message, ds) is not None
    ds.BitsAllocated, ds.PixelRepresentation = 16, 0
    assert allowance_for(Tool.HIGHDICOM, message, ds) is None
