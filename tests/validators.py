"""Three independent opinions on a DICOM file: dciodvfy, PixelMed and a highdicom read-back.

``validate(paths)`` runs all three on every file and takes away the findings of
:data:`ALLOW_LIST`, each a message that the standard shows to be the
validator's mistake (the clause is given with it). What is left is a defect
of the writer. ``assert_valid(paths)`` raises with every error that is left.

The tools:

dciodvfy (dicom3tools)
    One process per file. Lines with ``Error`` are errors, ``Warning`` warnings.
PixelMed (Debian ``libpixelmed-java``)
    ``com.pixelmed.validate.DicomInstanceValidator`` for the IODs it has rules
    for (Segmentation, Enhanced MR, ...; not MR Image or Parametric Map in the
    Debian build) and ``DicomSRValidator`` for SR. Both ``main`` methods take
    one file, and building a validator compiles its XSLT rules (seconds of
    CPU), so a :class:`PixelMed` session runs one JVM for many files: a small
    Java driver, run with the JDK's source launcher, builds each validator
    once and answers file after file. Lines starting ``Error:`` are errors,
    ``Warning:`` warnings. A SOP Class it has no rules for is reported as
    not judged (PixelMed itself prints ``IOD (SOP Class) unrecognized``).
highdicom
    Read back with the IOD class (``ParametricMap``, ``Segmentation``,
    ``Comprehensive3DSR``, ``imread`` for other images) under pydicom's strict
    reading, then frame and volume access (``get_frame``, ``get_volume``,
    ``get_volume_from_series`` for a series of single-frame images) and, for a
    TID 1500 report, every measurement group. An exception is an error, a
    warning raised meanwhile is a warning.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache, partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import highdicom as hd
import pytest
from pydicom import Dataset, config, dcmread
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from tests.conftest import need

__all__ = [
    "ALLOW_LIST",
    "Allowance",
    "FileResult",
    "Findings",
    "PixelMed",
    "PixelMedValidator",
    "Report",
    "Tool",
    "allowance_for",
    "assert_valid",
    "dciodvfy",
    "highdicom_readback",
    "highdicom_series_readback",
    "pixelmed",
    "validate",
]

T = TypeVar("T")


PIXELMED_JAR = Path(os.environ.get("PIXELMED_JAR", "/usr/share/java/pixelmed.jar"))
# C1 only and the serial collector: compiling PixelMed's XSLT rules is one long
# burst of class generation, which the optimising JIT and a parallel GC slow
# down rather than speed up (measured: about half the CPU time). The JDK's XPath
# limits are lifted: PixelMed's rules exceed them (JAXP0801003 without these).
_JVM_OPTIONS = (
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-Djava.awt.headless=true",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
_PIXELMED_TIMEOUT_S = 600.0


class Tool(str, Enum):
    """The validators."""

    DCIODVFY = "dciodvfy"
    PIXELMED = "pixelmed"
    HIGHDICOM = "highdicom"


@dataclass
class Findings:
    """What one tool said about one file.

    Attributes
    ----------
    tool : Tool
    errors, warnings : list of str
        The tool's messages, verbatim.
    notes : list of str
        Other lines (the IOD it recognised, progress), or why it did not judge the file.
    judged : bool
        False when the tool has no rules for the file's IOD.
    """

    tool: Tool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    judged: bool = True


# --------------------------------------------------------------------------- dciodvfy


def dciodvfy(path: Path | str) -> Findings:
    """Check one file against its IOD with dicom3tools' ``dciodvfy``."""
    r = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True, errors="replace", timeout=300)
    findings = Findings(Tool.DCIODVFY)
    for line in (r.stdout + r.stderr).splitlines():
        # "Error - ...", "Warning - ...", or "(0xgggg,0xeeee) VR Name - Error - ..." for one element
        head = line.split(" - ", 2)
        if line.startswith(("Error", "Abort")) or (len(head) > 2 and head[1] == "Error"):
            findings.errors.append(line)
        elif line.startswith("Warning") or (len(head) > 2 and head[1] == "Warning"):
            findings.warnings.append(line)
        elif line.strip():
            findings.notes.append(line)
    if r.returncode != 0 and not findings.errors:
        findings.errors.append(f"dciodvfy exited with status {r.returncode}")
    return findings


# --------------------------------------------------------------------------- PixelMed


class PixelMedValidator(str, Enum):
    """PixelMed's two validators, by the rules they carry."""

    INSTANCE = "iod"  # com.pixelmed.validate.DicomInstanceValidator
    SR = "sr"  # com.pixelmed.validate.DicomSRValidator


_RULES = {
    PixelMedValidator.INSTANCE: "com/pixelmed/validate/DicomIODDescriptionsCompiled.xsl",
    PixelMedValidator.SR: "com/pixelmed/validate/DicomSRDescriptionsCompiled.xsl",
}

_JAVA = r"""
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

/** Reads "iod=PATH" or "sr=PATH" lines; prints each validator's report followed by "@@@ END". */
public class AigwPixelmed {
    // one thread: building the two validators at once is slower on a small machine
    static final ExecutorService builder = Executors.newSingleThreadExecutor(r -> {
        Thread t = new Thread(r);
        t.setDaemon(true);
        return t;
    });
    static Future<DicomInstanceValidator> iod;
    static Future<DicomSRValidator> sr;

    static synchronized Future<DicomInstanceValidator> iod() {
        if (iod == null) iod = builder.submit(DicomInstanceValidator::new);
        return iod;
    }

    static synchronized Future<DicomSRValidator> sr() {
        if (sr == null) sr = builder.submit(DicomSRValidator::new);
        return sr;
    }

    public static void main(String[] args) throws Exception {
        PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
        for (String kind : args) {
            if (kind.equals("iod")) iod();
            if (kind.equals("sr")) sr();
        }
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            int eq = line.indexOf('=');
            String kind = line.substring(0, eq);
            String path = line.substring(eq + 1);
            String result;
            try {
                if (kind.equals("sr")) {
                    // the defaults of DicomSRValidator.main: no -describe, match the case of Code Meanings,
                    // no ambiguous-template, content-item-order or template-identifier checks
                    result = sr().get().validate(path, false, true, false, false, false);
                } else {
                    // as DicomInstanceValidator.main: read up to Pixel Data
                    AttributeList list = new AttributeList();
                    list.read(path, TagFromName.PixelData);
                    result = iod().get().validate(list);
                }
            } catch (ExecutionException e) {
                result = "@@@ EXCEPTION " + e.getCause() + "\n";
            } catch (Exception e) {
                result = "@@@ EXCEPTION " + e + "\n";
            }
            out.print(result);
            if (!result.endsWith("\n")) out.print("\n");
            out.print("@@@ END\n");
            out.flush();
        }
    }
}
"""


def _pixelmed_jar() -> Path:
    if not PIXELMED_JAR.is_file():
        pytest.fail(
            f"PixelMed is not installed: {PIXELMED_JAR} is missing (apt-get install libpixelmed-java, "
            "or set PIXELMED_JAR); run the README's test command"
        )
    return PIXELMED_JAR


@lru_cache(maxsize=4)
def _pixelmed_rules(jar: Path) -> dict[str, PixelMedValidator]:
    """SOP Class UID -> the PixelMed validator that has rules for it, read from the jar's compiled rules."""
    known: dict[str, PixelMedValidator] = {}
    # each IOD the rules know opens with a test on the SOP Class UID of the top-level dataset
    pattern = re.compile(rb"<xsl:when test=\"/Dicom[A-Za-z/]*/SOPClassUID/value = '([0-9.]+)'\">")
    with zipfile.ZipFile(jar) as z:
        for validator, name in _RULES.items():
            for uid in pattern.findall(z.read(name)):
                known[uid.decode()] = validator
    return known


def _sop_class(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID", ""))


def _parse_pixelmed(text: str) -> Findings:
    findings = Findings(Tool.PIXELMED)
    for line in text.splitlines():
        if line.startswith("Error"):
            findings.errors.append(line)
        elif line.startswith("Warning"):
            findings.warnings.append(line)
        elif line.startswith("@@@ EXCEPTION "):
            findings.errors.append(f"PixelMed failed: {line.removeprefix('@@@ EXCEPTION ')}")
        elif line.strip():
            findings.notes.append(line)
            if line.strip() == "IOD (SOP Class) unrecognized":
                # the rules were picked from its own list of SOP Classes: this must not happen
                findings.errors.append(f"PixelMed did not recognise an IOD its rules list: {line}")
    return findings


class PixelMed:
    """One PixelMed JVM that validates file after file.

    The validators named in ``warm`` start building (compiling their rules)
    as soon as the JVM is up, so a session opened before the files are
    written costs little more than the validation itself. Use it as a
    context manager, or call :meth:`close`.

    Parameters
    ----------
    warm : iterable of PixelMedValidator
        Validators to build at once; others are built on first use.
    """

    def __init__(self, warm: Iterable[PixelMedValidator] = tuple(PixelMedValidator)) -> None:
        java = need("java")
        need("javac")  # the source launcher compiles the driver with the JDK's compiler
        self.jar = _pixelmed_jar()
        self.rules = _pixelmed_rules(self.jar)
        self._dir = Path(tempfile.mkdtemp(prefix="aigw-pixelmed-"))
        source = self._dir / "AigwPixelmed.java"
        source.write_text(_JAVA)
        self._stderr = open(self._dir / "stderr.txt", "w+b")
        self._proc: subprocess.Popen[str] | None = subprocess.Popen(
            [java, *_JVM_OPTIONS, "-cp", str(self.jar), str(source), *(w.value for w in warm)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",
            errors="replace",
        )

    def validate(self, paths: Iterable[Path | str]) -> dict[Path, Findings]:
        """Validate each file with the PixelMed validator that has rules for its SOP Class."""
        out: dict[Path, Findings] = {}
        for p in map(Path, paths):
            sop = _sop_class(p)
            validator = self.rules.get(sop)
            if validator is None:
                out[p] = Findings(
                    Tool.PIXELMED,
                    judged=False,
                    notes=[f"not judged: {self.jar.name} has no IOD rules for SOP Class {sop} ({UID(sop).name})"],
                )
            else:
                out[p] = _parse_pixelmed(self._ask(validator, p.resolve()))
        return out

    def _ask(self, validator: PixelMedValidator, path: Path) -> str:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the PixelMed session is closed")
        if "\n" in str(path):
            raise ValueError(f"PixelMed: a file name with a line break cannot be passed on: {path!r}")
        watchdog = threading.Timer(_PIXELMED_TIMEOUT_S, proc.kill)
        watchdog.start()
        try:
            proc.stdin.write(f"{validator.value}={path}\n")
            proc.stdin.flush()
            lines: list[str] = []
            for line in iter(proc.stdout.readline, ""):
                if line == "@@@ END\n":
                    return "".join(lines)
                lines.append(line)
        except BrokenPipeError:
            pass
        finally:
            watchdog.cancel()
        raise RuntimeError(f"the PixelMed JVM ended while validating {path}:\n{self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        """End the JVM and remove the driver's folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PixelMed:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def pixelmed(paths: Iterable[Path | str], session: PixelMed | None = None) -> dict[Path, Findings]:
    """Validate files with PixelMed in one JVM (``session``'s, or a new one for this call)."""
    files = [Path(p) for p in paths]
    if session is not None:
        return session.validate(files)
    rules = _pixelmed_rules(_pixelmed_jar())
    needed = {rules[sop] for sop in map(_sop_class, files) if sop in rules}
    with PixelMed(warm=needed) as s:
        return s.validate(files)


# --------------------------------------------------------------------------- highdicom

_SR_CLASSES: dict[str, type[hd.sr.Comprehensive3DSR] | type[hd.sr.ComprehensiveSR] | type[hd.sr.EnhancedSR]] = {
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}


def _step(findings: Findings, what: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception as exc:  # any failure to read back is the finding
        findings.errors.append(f"{what}: {type(exc).__name__}: {exc}")
        return None


@contextmanager
def _recorded(findings: Findings) -> Iterator[None]:
    """pydicom's strict reading, and the warnings raised meanwhile as findings."""
    with warnings.catch_warnings(record=True) as caught, config.strict_reading():
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
                    findings.warnings.append(f"{w.category.__name__}: {w.message}")


def _decode_all(ds: Dataset) -> int:
    return sum(1 for elem in ds.iterall() if elem.value is not None)


def _frames_and_volume(findings: Findings, image: hd.Image | hd.seg.Segmentation) -> None:
    frames = int(image.get("NumberOfFrames", 1) or 1)
    for n in sorted({1, frames}):
        _step(findings, f"get_frame({n})", partial(image.get_frame, n))
    volume = _step(findings, "get_volume()", image.get_volume)
    if volume is not None:
        findings.notes.append(f"volume {volume.shape} in the {volume.coordinate_system.value} coordinate system")


def _measurements(group: Any) -> list[tuple[object, object]]:
    return [(m.value, m.unit) for m in group.get_measurements()]


def _evaluations(group: Any) -> list[tuple[object, object]]:
    return [(e.name, e.value) for e in group.get_qualitative_evaluations()]


def _region(group: Any) -> tuple[object, object]:
    return group.roi, group.referenced_segment


def _report_content(findings: Findings, sr: Dataset) -> None:
    content = _step(findings, "content", lambda: sr.content)
    if not isinstance(content, hd.sr.MeasurementReport):
        findings.notes.append("content is not a TID 1500 Measurement Report: only the document was read")
        return
    groups: list[Any] = [
        *content.get_image_measurement_groups(),
        *content.get_planar_roi_measurement_groups(),
        *content.get_volumetric_roi_measurement_groups(),
    ]
    findings.notes.append(f"TID 1500 report with {len(groups)} measurement group(s)")
    for k, group in enumerate(groups, 1):
        what = f"measurement group {k} ({type(group).__name__})"
        _step(findings, f"{what} measurements", partial(_measurements, group))
        _step(findings, f"{what} qualitative evaluations", partial(_evaluations, group))
        if hasattr(group, "referenced_segment"):
            _step(findings, f"{what} region", partial(_region, group))


def highdicom_readback(path: Path | str) -> Findings:
    """Read a file back with highdicom under strict reading and access its frames, volume and content."""
    path = Path(path)
    findings = Findings(Tool.HIGHDICOM)
    with _recorded(findings):
        ds = _step(findings, "dcmread", lambda: dcmread(path))
        if ds is None:
            return findings
        _step(findings, "decode every element", lambda: _decode_all(ds))
        sop = str(ds.get("SOPClassUID", ""))
        if sop == ParametricMapStorage:
            pm = _step(findings, "ParametricMap.from_dataset", lambda: hd.pm.ParametricMap.from_dataset(ds))
            if pm is not None:
                _frames_and_volume(findings, pm)
        elif sop == SegmentationStorage:
            seg = _step(findings, "Segmentation.from_dataset", lambda: hd.seg.Segmentation.from_dataset(ds))
            if seg is not None:
                _frames_and_volume(findings, seg)
                if seg.is_tiled:
                    _step(findings, "get_total_pixel_matrix()", seg.get_total_pixel_matrix)
        elif sop in _SR_CLASSES:
            sr = _step(findings, f"{_SR_CLASSES[sop].__name__}.from_dataset", lambda: _SR_CLASSES[sop].from_dataset(ds))
            if sr is not None:
                _report_content(findings, sr)
        elif any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            image = _step(findings, "imread", lambda: hd.imread(path))
            if image is not None:
                _frames_and_volume(findings, image)
        else:
            findings.judged = False
            findings.notes.append(f"not read back: no highdicom class for SOP Class {sop} ({UID(sop).name})")
    return findings


def highdicom_series_readback(paths: Iterable[Path | str]) -> dict[Path, Findings]:
    """Build one volume from each series of single-frame images among ``paths`` (two or more per series)."""
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for p in map(Path, paths):
        ds = dcmread(p)
        single_frame = int(ds.get("NumberOfFrames", 1) or 1) == 1
        if "PixelData" in ds and "PerFrameFunctionalGroupsSequence" not in ds and single_frame:
            series[str(ds.SeriesInstanceUID)].append((p, ds))
    out: dict[Path, Findings] = {}
    for uid, members in series.items():
        if len(members) < 2:
            continue
        findings = Findings(Tool.HIGHDICOM)
        with _recorded(findings):
            volume = _step(
                findings,
                f"get_volume_from_series({len(members)} images of series {uid})",
                partial(hd.get_volume_from_series, [ds for _, ds in members]),
            )
        if volume is not None:
            findings.notes.append(f"series of {len(members)} images read as one volume {volume.shape}")
        for p, _ in members:
            out[p] = findings
    return out


# --------------------------------------------------------------------------- allow-list


def _always(ds: Dataset, match: re.Match[str]) -> bool:
    return True


@dataclass(frozen=True)
class Allowance:
    """A validator message the standard shows to be wrong.

    Attributes
    ----------
    tool : Tool
    pattern : str
        Regular expression the whole message must match.
    clause : str
        Where the standard says otherwise.
    reason : str
        Why the validator is wrong, in a sentence or two.
    applies : callable
        ``applies(dataset, match)``: the extra condition under which the
        message is wrong (the dataset is read without pixel data).
    """

    tool: Tool
    pattern: str
    clause: str
    reason: str
    applies: Callable[[Dataset, re.Match[str]], bool] = _always

    def allows(self, tool: Tool, message: str, ds: Dataset) -> bool:
        """Whether this entry takes ``message`` of ``tool`` about ``ds`` away."""
        if tool is not self.tool:
            return False
        match = re.fullmatch(self.pattern, message)
        return match is not None and self.applies(ds, match)


def _content_item(ds: Dataset, position: str) -> Dataset | None:
    """The SR content item at PixelMed's position, e.g. "1.9.1": the root, then 1-based ordinals."""
    first, *rest = position.split(".")
    node: Dataset = ds
    if first != "1":
        return None
    for ordinal in rest:
        items = node.get("ContentSequence") or []
        k = int(ordinal) - 1
        if not 0 <= k < len(items):
            return None
        node = items[k]
    return node


# Image Region, Referenced Segment, Referenced Segmentation Frame, Volume Surface, Region In Space
_ROI_CONCEPTS = {"111030", "121191", "121214", "121231", "130488"}


def _group_without_roi(ds: Dataset, match: re.Match[str]) -> bool:
    """The Measurement Group at the position has no region of interest: a TID 1501 group."""
    group = _content_item(ds, match["position"])
    if group is None or group.get("ValueType") != "CONTAINER":
        return False
    name = (group.get("ConceptNameCodeSequence") or [Dataset()])[0]
    if (name.get("CodeValue"), name.get("CodingSchemeDesignator")) != ("125007", "DCM"):
        return False
    for child in group.get("ContentSequence") or []:
        child_name = (child.get("ConceptNameCodeSequence") or [Dataset()])[0]
        if child.get("ValueType") in ("SCOORD", "SCOORD3D") or child_name.get("CodeValue") in _ROI_CONCEPTS:
            return False
    return True


def _declared_extension(ds: Dataset, match: re.Match[str]) -> bool:
    """The code declares itself a private extension of the context group (PS3.3 8.7)."""
    item = _content_item(ds, match["position"])
    codes = item.get("ConceptCodeSequence") if item is not None else None
    if not codes:
        return False
    code = codes[0]
    return (
        code.get("ContextGroupExtensionFlag") == "Y"
        and str(code.get("ContextIdentifier", "")) == match["cid"]
        and bool(code.get("ContextGroupExtensionCreatorUID"))
    )


def _no_body_part(ds: Dataset, match: re.Match[str]) -> bool:
    """The instance names no body part, so none is a paired structure."""
    if "BodyPartExamined" in ds or "AnatomicRegionSequence" in ds:
        return False
    if any("PrimaryAnatomicStructureSequence" in it for it in ds.get("SpecimenDescriptionSequence") or []):
        return False
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or []), *(ds.get("PerFrameFunctionalGroupsSequence") or [])]
    return not any("FrameAnatomySequence" in g for g in groups)


def _derivation_image_per_frame(ds: Dataset, match: re.Match[str]) -> bool:
    """Derivation Image is in every Per-Frame Functional Groups item and not in the Shared one."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    return (
        bool(per_frame)
        and all("DerivationImageSequence" in it for it in per_frame)
        and not any("DerivationImageSequence" in it for it in shared)
    )


def _float_pixels(ds: Dataset, match: re.Match[str]) -> bool:
    """Float or Double Float Pixel Data: no Pixel Representation belongs in the instance."""
    return "PixelRepresentation" not in ds and ds.get("BitsAllocated") in (32, 64)


ALLOW_LIST: tuple[Allowance, ...] = (
    Allowance(
        Tool.PIXELMED,
        re.escape("Error: SpecimenMacro/ContainerDescription/: : Missing required attribute (Type 1)"),
        "PS3.3 C.7.6.22 Specimen Module (Table C.7.6.22-1): Container Description (0040,051A) is Type 3",
        "PixelMed's rules make the optional Container Description Type 1.",
    ),
    Allowance(
        Tool.PIXELMED,
        r"Error: ContentItemMacro/ConceptNameCodeSequence/: (?:\w+Sequence/Item\[\d+\]/)+ConceptNameCodeSequence: "
        r"Conditional attribute present when condition not satisfied",
        "PS3.3 10.2 Content Item Macro (Table 10-2): Concept Name Code Sequence (0040,A043) is Type 1; "
        "the attribute required only if Value Type is CODE is Concept Code Sequence (0040,A168)",
        "PixelMed's rule puts the CODE condition on the wrong attribute, so every non-CODE item is flagged "
        "for the Concept Name it must have (its own Type 1 check of the same attribute passes).",
    ),
    Allowance(
        Tool.PIXELMED,
        re.escape(
            "Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item[1]/: "
            "Missing required sequence attribute (Type 2)"
        ),
        "PS3.3 C.7.6.16 Multi-frame Functional Groups Module: a Functional Group Macro is in the Shared "
        "or in the Per-Frame Functional Groups Sequence, not both",
        "For a SEG without Plane Position (Patient) PixelMed requires Derivation Image in the Shared item "
        "and in every Per-Frame item, and also errors when it is in both: no instance can pass. Allowed "
        "only when the macro is in every Per-Frame item.",
        _derivation_image_per_frame,
    ),
    Allowance(
        Tool.PIXELMED,
        re.escape("Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute"),
        "PS3.3 C.7.3.1 General Series Module: Laterality (0020,0060) is Type 2C, required if the body part "
        "examined is a paired structure and Image, Frame and Measurement Laterality are absent",
        "PixelMed's rule drops the paired-structure half of the condition. Allowed only when the instance "
        "names no body part at all (no Body Part Examined, Anatomic Region, specimen anatomy or Frame Anatomy).",
        _no_body_part,
    ),
    Allowance(
        Tool.PIXELMED,
        r"Error: Template 1411 VolumetricROIMeasurements/\[Row 1\] CONTAINER \(125007,DCM,\"Measurement Group\"\)"
        r"/\[Row (?:5|7|10)\] \w+ \((?:111030|121191|121231),DCM,\"[^\"]+\"\): within (?P<position>1(?:\.\d+)+): "
        r".*: Missing conditional content item",
        "PS3.16 TID 1500 rows 7-9: each Measurement Group in Imaging Measurements is a TID 1410, a TID 1411 "
        "or a TID 1501 group, chosen by its own content",
        "PixelMed applies TID 1411 to every Measurement Group as soon as one of them references a segment "
        "(its choice counts over the whole container), so a TID 1501 group beside a TID 1411 group is "
        "checked for the region it rightly lacks. Allowed only for a group with no region of interest.",
        _group_without_roi,
    ),
    Allowance(
        Tool.PIXELMED,
        r"Error: Template 1500 MeasurementReport/\[Row 1\] CONTAINER CID 7021/\[Row 4\] CODE "
        r"\(121058,DCM,\"Procedure reported\"\): (?P<position>1(?:\.\d+)+): .*: "
        r"Code \([^)]*\) not found in context group (?P<cid>100)",
        "PS3.16 TID 1500 row 4 (value set BCID 100, Baseline, in PixelMed's own rules) and PS3.3 8.7 "
        "Context Group Extensions",
        "PixelMed reports any code outside the context group as an error, Baseline or not, and never reads "
        "the extension attributes. Allowed only when the code declares the extension "
        "(Context Group Extension Flag Y, Context Identifier 100, Extension Creator UID).",
        _declared_extension,
    ),
    Allowance(
        Tool.PIXELMED,
        re.escape(
            "Warning: MultiFrameDimensionModule/DimensionOrganizationType/: DimensionOrganizationType/value[1]: "
            "Unrecognized defined term :TILED_SPARSE:"
        ),
        "PS3.3 C.7.6.17 Multi-frame Dimension Module: TILED_SPARSE is a Defined Term of Dimension "
        "Organization Type (0020,9311)",
        "PixelMed's list of Defined Terms lacks TILED_SPARSE.",
    ),
    Allowance(
        Tool.PIXELMED,
        re.escape(
            "Warning: SOPCommonModule/SpecificCharacterSet/: SpecificCharacterSet/value[1]: "
            "Unrecognized defined term :ISO_IR 192:"
        ),
        "PS3.3 C.12.1.1.2 Specific Character Set: ISO_IR 192 (UTF-8) is a Defined Term for multi-byte "
        "character sets without code extensions",
        "PixelMed's list of Defined Terms lacks ISO_IR 192.",
    ),
    Allowance(
        Tool.HIGHDICOM,
        r"get_frame\(\d+\): AttributeError: 'ParametricMap' object has no attribute 'PixelRepresentation'",
        "PS3.3 C.7.6.24 Floating Point Image Pixel Module and C.8.32.2 Parametric Map Image Module: "
        "no Pixel Representation with Float or Double Float Pixel Data",
        "highdicom's get_frame reads Pixel Representation, which a float Parametric Map does not have "
        "(its get_volume reads the same frames without it). Allowed only for float pixel data.",
        _float_pixels,
    ),
)


def allowance_for(tool: Tool, message: str, ds: Dataset) -> Allowance | None:
    """The :data:`ALLOW_LIST` entry that takes ``message`` away, if any."""
    return next((a for a in ALLOW_LIST if a.allows(tool, message, ds)), None)


# --------------------------------------------------------------------------- reports


@dataclass
class FileResult:
    """The three opinions on one file, and what the allow-list took away."""

    path: Path
    sop_class_uid: str
    findings: dict[Tool, Findings]
    allowed: list[tuple[Tool, str, Allowance]] = field(default_factory=list)

    @property
    def sop_class_name(self) -> str:
        return UID(self.sop_class_uid).name

    def errors(self) -> list[str]:
        return [f"{t.value}: {e}" for t, f in self.findings.items() for e in f.errors]

    def warnings(self) -> list[str]:
        return [f"{t.value}: {w}" for t, f in self.findings.items() for w in f.warnings]

    def text(self) -> str:
        lines = [f"== {self.path.name}: {self.sop_class_name}"]
        for tool, f in self.findings.items():
            state = "" if f.judged else " (not judged)"
            lines.append(f"-- {tool.value}{state}: {len(f.errors)} error(s), {len(f.warnings)} warning(s)")
            lines += [f"   {m}" for m in f.errors + f.warnings]
            if not f.judged:
                lines += [f"   {m}" for m in f.notes]
        for tool, message, allowance in self.allowed:
            lines.append(f"-- allowed ({tool.value}, {allowance.clause}): {message}")
        return "\n".join(lines)


@dataclass
class Report:
    """The results of :func:`validate`, file by file."""

    files: list[FileResult]

    def select(self, keep: Callable[[FileResult], bool]) -> Report:
        """The files ``keep`` picks."""
        return Report([f for f in self.files if keep(f)])

    def errors(self) -> list[str]:
        return [f"{f.path.name} [{f.sop_class_name}] {e}" for f in self.files for e in f.errors()]

    def warnings(self) -> list[str]:
        return [f"{f.path.name} [{f.sop_class_name}] {w}" for f in self.files for w in f.warnings()]

    def text(self) -> str:
        return "\n".join(f.text() for f in self.files)

    def check(self, *, fail_on_warnings: bool = False) -> None:
        """Raise AssertionError listing every error that the allow-list did not take away.

        Parameters
        ----------
        fail_on_warnings : bool
            Fail on remaining warnings too. They are listed after the errors either way.
        """
        errors = self.errors()
        warned = self.warnings()
        if errors or (fail_on_warnings and warned):
            raise AssertionError(
                f"{len(errors)} validation error(s) in {len(self.files)} file(s):\n"
                + "\n".join(errors)
                + (f"\n{len(warned)} warning(s):\n" + "\n".join(warned) if warned else "")
            )


def validate(paths: Iterable[Path | str], pixelmed_session: PixelMed | None = None) -> Report:
    """Judge every file with dciodvfy, PixelMed and a highdicom read-back, less the :data:`ALLOW_LIST`.

    Parameters
    ----------
    paths : iterable of path
        DICOM files (PS3.10).
    pixelmed_session : PixelMed, optional
        A running PixelMed JVM; by default one is started for this call.
    """
    files = [Path(p) for p in paths]
    by_pixelmed = pixelmed(files, pixelmed_session)
    by_series = highdicom_series_readback(files)
    results = []
    for p in files:
        readback = highdicom_readback(p)
        if p in by_series:
            series = by_series[p]
            readback.errors += series.errors
            readback.warnings += series.warnings
            readback.notes += series.notes
        findings = {Tool.DCIODVFY: dciodvfy(p), Tool.PIXELMED: by_pixelmed[p], Tool.HIGHDICOM: readback}
        ds = dcmread(p, stop_before_pixels=True)
        result = FileResult(p, str(ds.get("SOPClassUID", "")), findings)
        for tool, f in findings.items():
            for kept in (f.errors, f.warnings):
                for message in list(kept):
                    allowance = allowance_for(tool, message, ds)
                    if allowance is not None:
                        kept.remove(message)
                        result.allowed.append((tool, message, allowance))
        results.append(result)
    return Report(results)


def assert_valid(
    paths: Iterable[Path | str], pixelmed_session: PixelMed | None = None, *, fail_on_warnings: bool = False
) -> Report:
    """:func:`validate`, raising AssertionError with every error left (and warning, if asked); returns the report."""
    report = validate(paths, pixelmed_session)
    report.check(fail_on_warnings=fail_on_warnings)
    return report
