"""Options of the template pipeline (``[pipelines.test-invert]``)."""

from __future__ import annotations

from pydantic import Field

from gateway.contract import PipelineOptions

__all__ = ["InvertOptions"]


class InvertOptions(PipelineOptions):
    """Each field is one key of the table; the description is its entry in ``docs/options.md``."""

    modalities: tuple[str, ...] = Field(("MR",), min_length=1, description="modalities the default selector takes")
    max_value: int = Field(4095, ge=1, le=65535, description="the white level the images are inverted against")
    sleep_seconds: float = Field(0.0, ge=0, le=3600, description="test knob: pause inside run, to kill a job midway")
    fail_times: int = Field(
        0, ge=0, le=100, description="test knob: fail the first N attempts with a transient error (retry tests)"
    )
