"""Options of the IVIM pipeline: the ``[pipelines.ivim]`` table of the configuration.

The gateway validates the table against :class:`IvimOptions` when the
configuration is checked and at start, so a misspelt key or a value outside
what a field allows stops the service with the file, the key and the reason,
instead of silently changing which maps are made.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from gateway.contract import PipelineOptions

__all__ = ["METHODS", "IvimMethod", "IvimOptions"]

#: How the IVIM parameters are estimated (the ``method`` option): ``"net"``,
#: the exported set network ``ivim-net`` (any protocol of 4 to 20 b-values in
#: [0, 1200] s/mm2); ``"lsq-segmented"``, conventional segmented least squares
#: (D from the high b-values, then f, then D*); ``"lsq-full"``, bounded
#: bi-exponential least squares started from the segmented fit. A Literal
#: rather than an Enum, so the configuration, its error messages and the
#: options reference all show the plain names.
IvimMethod = Literal["net", "lsq-segmented", "lsq-full"]
#: The names of :data:`IvimMethod`, in order.
METHODS: tuple[IvimMethod, ...] = get_args(IvimMethod)


class IvimOptions(PipelineOptions):
    """Each field is one key of ``[pipelines.ivim]``; its description is its entry in ``docs/options.md``."""

    method: IvimMethod = Field(
        "net",
        description='estimator of D, D*, f and S0: "net" (the exported network), "lsq-segmented" or "lsq-full"'
        " (bounded least squares)",
    )
    derived_series: bool = Field(
        True,
        description="also send one classic MR series per parameter, for viewers without Parametric Map support",
    )
    uncertainty: bool = Field(
        True,
        description='with method "net", also send the per-voxel standard deviation of D, D* and f (the'
        " network's calibrated uncertainty) as Parametric Maps, and as derived MR series if derived_series is"
        " on; the least-squares methods give none",
    )
    mask_fraction: float = Field(
        0.08,
        ge=0.0,
        le=1.0,
        description="0 to 1: voxels whose lowest-b signal is under this fraction of its 99th percentile are"
        " background, not fitted, and 0 in the maps",
    )
    # Fewer than 4 distinct b-values cannot determine the four parameters;
    # run() refuses such a series, so the selector must not take it either.
    min_bvalues: int = Field(
        4,
        ge=4,
        description="distinct b-values the default selector requires of a series (at least 4, what the fits need)",
    )
