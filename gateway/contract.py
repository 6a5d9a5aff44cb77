"""The pipeline plugin contract: the only gateway module a pipeline imports.

A pipeline plugin is an object with a ``name``, a default selector that looks
at series headers only, the list of exported models it needs and a ``run``
method that turns an assembled series into DICOM datasets to send back. The
gateway owns everything else: storage, completion, routing, retries, sending.

Plugins are discovered through the ``aigw.pipelines`` entry point group; the
entry point names the factory, usually the pipeline class. A factory with an
``options_model`` attribute (a :class:`PipelineOptions` subclass) is called
with the validated ``[pipelines.<name>]`` table; one without it is called
with no arguments and accepts no options. Importing a plugin must be cheap
and must not fail because an optional dependency is missing: raise
:class:`PipelineUnavailable` from the factory instead, and the gateway lists
the plugin as unavailable with the reason.

Every built-in pipeline has the same shape (``pipelines/<name>/``):
``pipeline.py`` (selector and run), ``options.py``, ``preprocess.py``,
``infer.py``, ``dicom.py``, and ``lab/`` for what never runs in the service.
``tests/plugins/invert/`` is the smallest complete example to copy.

Example
-------
A complete minimal plugin::

    from gateway.contract import ModelSpec, PipelineOptions, RunContext, Selection, Series, SeriesInfo

    class InvertOptions(PipelineOptions):
        modality: str = Field("MR", description="modality the default selector takes")

    class Invert:
        name = "invert"
        options_model = InvertOptions

        def __init__(self, options: InvertOptions | None = None) -> None:
            self.options = options or InvertOptions()

        def selects(self, series: SeriesInfo) -> Selection:
            if series.modality != self.options.modality:
                return Selection(False, f"modality is {series.modality}, not {self.options.modality}")
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

from pydantic import BaseModel, ConfigDict

from gateway._pixels import Frame, Geometry, Instance
from gateway.uids import derived_uid

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
    "PipelineOptions",
    "PipelineUnavailable",
    "RunContext",
    "Selection",
    "Series",
    "SeriesInfo",
    "WarmUpCapable",
    "derived_series_number",
    "derived_uid",
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


class PipelineOptions(BaseModel):
    """Base of a pipeline's options: the ``[pipelines.<name>]`` table of the configuration.

    Subclass it next to the pipeline (``options.py``) with one typed field per
    option, each with a default and a ``description`` (the options reference,
    ``docs/options.md``, is generated from them). Unknown keys and bad values
    are refused when the configuration is checked and at start, naming the
    file, the key and the reason; a pipeline never sees an option it did not
    declare. ``enabled`` belongs to the gateway and is never passed on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Largest source Series Number that :func:`derived_series_number` keeps whole.
_SERIES_BLOCK = 100_000


def derived_series_number(source: object, offset: int) -> int:
    """Series Number of a result series: the source's, times ten, plus ``offset`` (1 to 9).

    Results sort next to their source in a viewer's series list (source 7 gives
    71, 72, ... 79), and each result type of a pipeline keeps its own fixed
    offset, so a rerun lands on the same number. Source numbers above 99,999
    wrap so the result fits the IS value representation (at most 12 characters).

    Parameters
    ----------
    source : object
        The source's Series Number (0020,0011) as read: int, str, IS or None.
    offset : int
        The result type's digit, 1 to 9 (0 is left to the source's own numbering).
    """
    if not 1 <= offset <= 9:
        raise ValueError(f"a result series offset is 1 to 9, got {offset}")
    try:
        number = int(str(source).strip() or 0) if source is not None else 0
    except ValueError:
        number = 0
    return abs(number) % _SERIES_BLOCK * 10 + offset


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
    """What a pipeline plugin implements.

    Its options, when it declares an ``options_model``, arrive in its factory
    (``__init__``) already validated, so the selector and ``run`` read the
    same typed values from the instance.
    """

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


@runtime_checkable
class WarmUpCapable(Protocol):
    """Optional hook: load at start what a pipeline's first job would otherwise load.

    ``warm_up()`` is called once per process after the pipeline's models have
    been warmed up (``[models] warmup``), before any job: a place for tables
    and caches that cost a first job noticeable time (highdicom's standard
    tables, for example). It takes no series and must be quick; an exception
    is logged and the first job pays instead.
    """

    def warm_up(self) -> None: ...
