"""Options of the lf2hf pipeline: the ``[pipelines.lf2hf]`` table of the configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.contract import PipelineOptions

__all__ = ["ACCEPTED_FIELD_RANGE_T", "Lf2hfOptions"]

#: Field strengths (T) a run accepts at all: outside it the physics the model
#: learnt (low-field relaxation and noise) says nothing about the series.
ACCEPTED_FIELD_RANGE_T: tuple[float, float] = (0.01, 1.5)


class Lf2hfOptions(PipelineOptions):
    """What a site may change about which series lf2hf takes and how it reads them.

    Bounds are checked when the configuration is loaded, so a value the run
    would refuse for every series (a field the model cannot translate) never
    reaches a job.
    """

    max_field_t: float = Field(
        1.0,
        gt=0.0,
        le=ACCEPTED_FIELD_RANGE_T[1],
        description="The default selector takes MR series whose MagneticFieldStrength is below this (T); "
        f"0 < value <= {ACCEPTED_FIELD_RANGE_T[1]:g}, the most a run accepts.",
    )
    assume_field_t: float | None = Field(
        None,
        ge=ACCEPTED_FIELD_RANGE_T[0],
        le=ACCEPTED_FIELD_RANGE_T[1],
        description="Field strength (T) to use when a routed series lacks MagneticFieldStrength; "
        f"{ACCEPTED_FIELD_RANGE_T[0]:g} to {ACCEPTED_FIELD_RANGE_T[1]:g}. None: such a job fails with that reason.",
    )
    contrast: Literal["auto", "T1w", "T2w"] = Field(
        "auto",
        description='Weighting told to the network: "auto" (from the series description, else the echo time), '
        '"T1w" or "T2w".',
    )
