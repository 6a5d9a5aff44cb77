"""The options of the wsi-mil pipeline: the ``[pipelines.wsi-mil]`` table of the configuration.

Both thresholds are probabilities of the exported head and apply to the
report only: the Segmentation always carries the tile probabilities
themselves, so a viewer or a reader can apply a threshold of its own.
"""

from __future__ import annotations

from pydantic import Field

from gateway.contract import PipelineOptions

__all__ = ["WsiMilOptions"]


class WsiMilOptions(PipelineOptions):
    """Thresholds of the slide report and the tolerance for damaged slides.

    Examples
    --------
    In ``aigw.toml``::

        [pipelines.wsi-mil]
        slide_threshold = 0.7
        max_unreadable_fraction = 0.01
    """

    slide_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Slide called tumour-positive (Presence of property = Present in the report) at or above "
        "this slide probability, 0 to 1.",
    )
    tile_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Tiles counted in the report's tumour area at or above this tile probability, 0 to 1.",
    )
    max_unreadable_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="The job fails (a damaged slide) when more than this fraction, 0 to 1, of the tiles examined "
        "(those of the regions that hold tissue) cannot be decoded; below it the unreadable tiles are left out, "
        "logged and counted in "
        'aigw_pipeline_flags_total{pipeline="wsi-mil",kind="unreadable_tile"}.',
    )
