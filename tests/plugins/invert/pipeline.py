"""The template pipeline's plugin class: selector and run, nothing else."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset

from gateway.contract import InputError, ModelSpec, RunContext, Selection, Series, SeriesInfo
from tests.plugins.invert.dicom import inverted_image
from tests.plugins.invert.infer import MODEL_NAME, invert
from tests.plugins.invert.options import InvertOptions
from tests.plugins.invert.preprocess import read_images

__all__ = ["HANG_SECONDS", "InvertPipeline"]

#: How long a series whose description says HANG keeps its job running.
HANG_SECONDS = 8.0


class InvertPipeline:
    """Inverts every MR image of a series into a derived series."""

    name = "test-invert"
    options_model = InvertOptions

    def __init__(self, options: InvertOptions | None = None) -> None:
        self.options = options or InvertOptions()

    def selects(self, series: SeriesInfo) -> Selection:
        if series.modality not in self.options.modalities:
            return Selection(False, f"modality {series.modality!r} is not one of {', '.join(self.options.modalities)}")
        return Selection(True, f"{series.modality} series")

    def models(self) -> Sequence[ModelSpec]:
        return [ModelSpec(MODEL_NAME)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        description = str(series.first("SeriesDescription", ""))
        if "REJECT" in description:
            raise InputError("series description asks for rejection")
        if "CRASH" in description:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash in a model runtime or the out-of-memory killer would
        if "HANG" in description:
            time.sleep(HANG_SECONDS)  # as a deadlock would, for as long as a test can wait
        self._test_knobs(ctx)
        images = read_images(series)
        out = []
        for k, ((ds, pixels), inst) in enumerate(zip(images, series.sorted_by_position())):
            inverted = invert(ctx.sessions[MODEL_NAME], pixels, self.options.max_value)
            out.append(inverted_image(ds, inverted, self.options.max_value, k, ctx, inst.sop_instance_uid))
            ctx.progress((k + 1) / len(images), "inverted")
        return out

    def _test_knobs(self, ctx: RunContext) -> None:
        if self.options.fail_times:
            # Counted in the job folder, so the count survives a restart of the service.
            counter = ctx.workdir / "attempts"
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n < self.options.fail_times:
                raise RuntimeError(f"simulated transient failure {n + 1}/{self.options.fail_times}")
        time.sleep(self.options.sleep_seconds)

    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from tests.plugins.invert.lab.model import demo_study

        return demo_study(folder, seed)
