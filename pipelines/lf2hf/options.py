"""Options of the lf2hf pipeline: the ``[pipelines.lf2hf]`` table of the configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.contract import PipelineOptions

__all__ = ["ACCEPTED_FIELD_RANGE_T", "DOMAIN_BODY_PARTS", "Lf2hfOptions"]

#: Field strengths (T) a run accepts at all: outside it the physics the model
#: learnt (low-field relaxation and noise) says nothing about the series.
ACCEPTED_FIELD_RANGE_T: tuple[float, float] = (0.01, 1.5)
#: BodyPartExamined (0018,0015) values of the network's domain (PS3.16 CID 4030 defined terms).
DOMAIN_BODY_PARTS: tuple[str, ...] = ("BRAIN", "HEAD", "SKULL")


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
    translate_contrast: Literal["auto", "never"] = Field(
        "auto",
        description='"auto": the AI 3 T-like contrast translation runs on series the domain gate accepts (brain '
        'spin echo, known weighting, consistent output), the others get the contrast-preserving result; '
        '"never": every series gets the contrast-preserving result (denoising and 2x, see contrast_preserving).',
    )
    out_of_domain: Literal["contrast_preserving", "no_result"] = Field(
        "contrast_preserving",
        description="What a series the domain gate turns away gets: the contrast-preserving result (labelled so in "
        'its Series Description), or "no_result": the job fails with the reason and nothing goes to PACS.',
    )
    contrast_preserving: Literal["learned", "tv"] = Field(
        "learned",
        description='How the contrast-preserving result is made: "learned": the unrolled data-consistent '
        'restoration (model lf2hf-dc: gradient steps through the acquisition operator and a learned prior, '
        'trained on domain-randomised anatomy); "tv": the classical total-variation reconstruction.',
    )
    domain_body_parts: tuple[str, ...] = Field(
        DOMAIN_BODY_PARTS,
        description="BodyPartExamined values the contrast translation accepts; a series naming another body part "
        "gets the contrast-preserving result. A series without the attribute is judged from its images.",
    )
    max_residual_to_noise: float = Field(
        1.5,
        gt=0.0,
        description="Largest rms of (output taken back to the acquired grid - acquired) over the noise sigma "
        "estimated from the image, for a contrast-preserving slice; above it the job fails with that reason "
        "(the reconstruction does not explain the data). About 0.5 to 1 for a good result.",
    )
