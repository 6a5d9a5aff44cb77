"""The pipeline plugin contract: the only gateway module a pipeline imports.

A pipeline plugin is an object with a ``name``, a default selector that looks
at series headers only, the list of exported models it needs and a ``run``
method that turns an assembled series into DICOM datasets to send back. The
gateway owns everything else: storage, completion, routing, retries, sending.

Plugins are discovered through the ``aigw.pipelines`` entry point group; the
entry point names a zero-argument callable (usually the class) returning the
pipeline object.  Importing a plugin must be cheap and must not fail because
an optional dependency is missing: raise :class:`PipelineUnavailable` from the
factory instead, and the gateway lists the plugin as unavailable with the
reason.

Example
-------
A complete minimal plugin (the test suite ships one like it)::

    from gateway.contract import ModelSpec, RunContext, Selection, Series, SeriesInfo

    class Invert:
        name = "invert"

        def selects(self, series: SeriesInfo) -> Selection:
            if series.modality != "MR":
                return Selection(False, f"modality is {series.modality}, not MR")
            return Selection(True, "MR series")

        def models(self) -> list[ModelSpec]:
            return [ModelSpec("invert")]

        def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
            session = ctx.sessions["invert"]
            ...
            return [derived_dataset]
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from pydicom import dcmread

if TYPE_CHECKING:
    import onnxruntime
    from pydicom import Dataset

__all__ = [
    "DemoCapable",
    "Frame",
    "Geometry",
    "Identity",
    "Instance",
    "InputError",
    "ModelSpec",
    "Pipeline",
    "PipelineUnavailable",
    "RunContext",
    "Selection",
    "Series",
    "SeriesInfo",
]


class InputError(ValueError):
    """The series cannot be processed by this pipeline (a permanent failure).

    Raise it with a message that says what was wrong with the input and what
    was expected, without patient data. The job fails at once, without retries.
    Any other exception is treated as possibly transient and retried.
    """


class PipelineUnavailable(RuntimeError):
    """Raised by a plugin factory when the plugin cannot run on this install."""


class Selection(NamedTuple):
    """The verdict of a selector, with the reason shown by ``aigw route explain``."""

    matched: bool
    reason: str


@dataclass(frozen=True)
class ModelSpec:
    """An exported model a pipeline needs, by its manifest name.

    Parameters
    ----------
    name : str
        The ``name`` of the model in ``exported_models/<name>.json``.
    batch_size : int
        Preferred inference batch size (items per ``session.run`` call).
    """

    name: str
    batch_size: int = 64


@dataclass(frozen=True)
class Identity:
    """Who made a derived object: written to Equipment and Contributing Equipment."""

    manufacturer: str
    model_name: str
    software_version: str
    device_serial_number: str
    institution_name: str | None = None


@dataclass(frozen=True)
class Geometry:
    """Position of a 2D image plane in the patient coordinate system (PS3.3 C.7.6.2)."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the plane (row direction x column direction)."""
        o = np.asarray(self.orientation, dtype=float)
        n = np.cross(o[:3], o[3:])
        return n / (np.linalg.norm(n) or 1.0)

    @property
    def slice_location(self) -> float:
        """Signed distance of the plane along its normal, for sorting slices."""
        return float(np.dot(self.normal, np.asarray(self.position, dtype=float)))


def _geometry(ds: Mapping[str, Any]) -> Geometry | None:
    try:
        pos = ds["ImagePositionPatient"]
        ori = ds["ImageOrientationPatient"]
        spacing = ds["PixelSpacing"]
        if len(pos) != 3 or len(ori) != 6 or len(spacing) != 2:
            return None
        thickness = ds.get("SliceThickness")
        return Geometry(
            tuple(float(v) for v in pos),  # type: ignore[arg-type]
            tuple(float(v) for v in ori),  # type: ignore[arg-type]
            (float(spacing[0]), float(spacing[1])),
            float(thickness) if thickness not in (None, "") else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Frame:
    """One 2D frame of an instance: pixels with the modality LUT applied, and where it lies.

    ``group(name)`` returns a functional group macro of the frame (per-frame
    first, then shared; PS3.3 C.7.6.16) of enhanced multi-frame images, and
    None for classic images; ``header`` is the instance's data set.
    """

    index: int
    pixels: np.ndarray
    geometry: Geometry | None
    group: Callable[[str], Dataset | None]
    header: Dataset


def _no_groups(name: str) -> Dataset | None:
    return None


def _group_lookup(item: Dataset, shared: Dataset | None) -> Callable[[str], Dataset | None]:
    def group(name: str) -> Dataset | None:
        for src in (item, shared):
            if src is not None and name in src and src[name].value:
                return src[name].value[0]  # type: ignore[no-any-return]
        return None

    return group


def _frame_geometry(group: Callable[[str], Dataset | None]) -> Geometry | None:
    pos, ori, meas = (group(n) for n in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
    if pos is None or ori is None or meas is None:
        return None
    return _geometry(
        {
            "ImagePositionPatient": pos.get("ImagePositionPatient"),
            "ImageOrientationPatient": ori.get("ImageOrientationPatient"),
            "PixelSpacing": meas.get("PixelSpacing"),
            "SliceThickness": meas.get("SliceThickness"),
        }
    )


@dataclass(frozen=True)
class Instance:
    """One stored instance of a series: its file and the headers the index kept.

    ``headers`` maps DICOM keywords (and ``ggggeeee`` hex tags for private
    elements) to values; nested functional-group values of multi-frame images
    are gathered as lists of distinct values.
    """

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    headers: Mapping[str, Any]

    def dataset(self, pixels: bool = True) -> Dataset:
        """Read the instance from disk (headers only when ``pixels`` is False)."""
        return dcmread(self.path, stop_before_pixels=not pixels)

    def pixel_array(self) -> np.ndarray:
        """Stored pixels with the modality LUT (rescale slope and intercept) applied, as float32.

        Shape is ``(rows, columns)``, ``(frames, rows, columns)`` or with a
        trailing samples axis for colour images, as pydicom returns it.
        """
        ds = self.dataset()
        arr = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0 or intercept != 0.0:
            arr = arr * np.float32(slope) + np.float32(intercept)
        return arr

    @property
    def geometry(self) -> Geometry | None:
        """Plane geometry for single-frame cross-sectional images, else None."""
        return _geometry(self.headers)

    def frames(self) -> Iterator[Frame]:
        """Every frame with its geometry, for classic and enhanced multi-frame images alike.

        Pixels are float32 with rescale applied, ``(rows, columns)`` for
        grayscale or ``(rows, columns, samples)`` for colour.
        """
        ds = self.dataset()
        arr = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame:
            shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
            n = int(ds.get("NumberOfFrames", 1) or 1)
            frames = arr if n > 1 else arr[None]
            for i, item in enumerate(per_frame):
                group = _group_lookup(item, shared)
                trans = group("PixelValueTransformationSequence")
                s = float(trans.get("RescaleSlope", 1) or 1) if trans is not None else slope
                b = float(trans.get("RescaleIntercept", 0) or 0) if trans is not None else intercept
                yield Frame(i, frames[i] * np.float32(s) + np.float32(b), _frame_geometry(group), group, ds)
            return
        pixels = arr * np.float32(slope) + np.float32(intercept)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if n > 1:  # multi-frame without functional groups: no per-frame geometry
            for i in range(n):
                yield Frame(i, pixels[i], None, _no_groups, ds)
        else:
            yield Frame(0, pixels, self.geometry, _no_groups, ds)


@dataclass(frozen=True)
class SeriesInfo:
    """What a selector may look at: headers of a series, no pixel data.

    Parameters
    ----------
    series_uid, study_uid : str
        Identifiers (never logged; use ``Series.short_id`` in messages).
    modality : str
        Modality of the first instance.
    calling_ae : str
        AE title of the sender of the first instance.
    instances : sequence of Instance
        Every instance of the series in arrival order.
    """

    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    instances: Sequence[Instance]

    @property
    def instance_count(self) -> int:
        return len(self.instances)

    @cached_property
    def sop_class_uids(self) -> frozenset[str]:
        return frozenset(i.sop_class_uid for i in self.instances)

    def first(self, keyword: str, default: Any = None) -> Any:
        """Value of ``keyword`` in the first instance that has it."""
        for inst in self.instances:
            if keyword in inst.headers:
                return inst.headers[keyword]
        return default

    def values(self, keyword: str) -> frozenset[Any]:
        """Distinct values of ``keyword`` over the series (multi-valued and nested values flattened)."""
        out: set[Any] = set()
        for inst in self.instances:
            v = inst.headers.get(keyword)
            if v is None:
                continue
            if isinstance(v, list):
                out.update(_hashable(x) for x in v)
            else:
                out.add(_hashable(v))
        return frozenset(out)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class Series(SeriesInfo):
    """An assembled, complete series handed to :meth:`Pipeline.run`."""

    version: int = 1

    @property
    def short_id(self) -> str:
        """A short, non-identifying reference to the series for logs."""
        return hashlib.sha256(self.series_uid.encode()).hexdigest()[:10]

    def sorted_by_position(self) -> list[Instance]:
        """Instances sorted along the slice normal, falling back to InstanceNumber."""

        def key(inst: Instance) -> tuple[float, float]:
            g = inst.geometry
            loc = g.slice_location if g is not None else 0.0
            return (loc, float(inst.headers.get("InstanceNumber") or 0))

        return sorted(self.instances, key=key)

    def datasets(self, pixels: bool = True) -> Iterator[Dataset]:
        """Read each instance in arrival order (streaming: one in memory at a time)."""
        for inst in self.instances:
            yield inst.dataset(pixels=pixels)


@dataclass
class RunContext:
    """Services the gateway gives a pipeline for one job.

    Attributes
    ----------
    sessions : mapping of str to onnxruntime.InferenceSession
        One session per declared model, created on the chosen device.
    uid : callable
        ``uid(key)`` returns a UID that is the same every time this job runs
        (derived from the source series, pipeline, model versions and key).
    identity : Identity
        This software's identity for Equipment modules.
    workdir : Path
        A folder private to this job; pipelines write nowhere else.
    options : mapping
        The ``[pipelines.<name>]`` table of the configuration.
    log : logging.Logger or LoggerAdapter
        Logger tagged with the job id. Never log patient data.
    progress : callable
        ``progress(fraction, message)`` with fraction in [0, 1].
    model_versions : mapping of str to str
        Version of each declared model, for derivation descriptions.
    flag : callable
        ``flag(kind, count)`` counts events operations should see, such as
        slices failing a consistency check; exported as
        ``aigw_pipeline_flags_total{pipeline, kind}``. Use a few fixed kinds.
    batch_sizes : mapping of str to int
        Items per ``session.run`` for each declared model: the model's
        :attr:`ModelSpec.batch_size` unless ``[models] batch_sizes`` overrides
        it for this node. Read it with :meth:`batch_size`.
    """

    sessions: Mapping[str, onnxruntime.InferenceSession]
    uid: Callable[[str], str]
    identity: Identity
    workdir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.getLogger("gateway.pipeline")
    )
    progress: Callable[[float, str], None] = lambda fraction, message: None
    model_versions: Mapping[str, str] = field(default_factory=dict)
    flag: Callable[[str, int], None] = lambda kind, count: None
    batch_sizes: Mapping[str, int] = field(default_factory=dict)

    def batch_size(self, name: str, default: int) -> int:
        """Items per ``session.run`` for model ``name``: the configured size, else ``default``."""
        return int(self.batch_sizes.get(name, default))


@runtime_checkable
class Pipeline(Protocol):
    """What a pipeline plugin implements."""

    name: str

    def selects(self, series: SeriesInfo) -> Selection:
        """Default selector: does this series suit the pipeline? Headers only."""
        ...

    def models(self) -> Sequence[ModelSpec]:
        """The exported models the pipeline needs (empty if none)."""
        ...

    def run(self, series: Series, ctx: RunContext) -> Sequence[Dataset]:
        """Process a complete series and return the DICOM datasets to send."""
        ...


@runtime_checkable
class DemoCapable(Protocol):
    """Optional hook a pipeline implements to take part in ``aigw demo``.

    ``demo_study`` writes a synthetic study (DICOM files) that the pipeline's
    default selector accepts and returns their paths. A pipeline may also
    define ``demo_preview(inputs, outputs) -> [(title, PIL.Image)]`` to draw
    its own pictures for the report (for example maps with colour bars);
    without it the demo shows the middle input image and the first output.
    """

    def demo_study(self, folder: Path, seed: int) -> Sequence[Path]: ...
