"""A small test-only pipeline plugin: inverts MR images with a tiny ONNX model.

It exercises the whole contract (selector, declared model, sessions,
deterministic UIDs, derived DICOM out) and has knobs for failure tests:

* option ``sleep_seconds``: pause inside ``run`` so a test can kill the
  service mid-job;
* option ``fail_times``: raise a transient error on the first N attempts
  (counted in a file in the job folder, so it survives a restart);
* a series whose SeriesDescription contains ``REJECT`` fails with InputError.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.contract import InputError, ModelSpec, RunContext, Selection, Series, SeriesInfo

MODEL_NAME = "test-invert"


def build_model(folder: Path) -> Path:
    """Write ``test-invert.onnx`` (y = 4095 - x) and its manifest into ``folder``."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "H", "W"])
    y = helper.make_tensor_value_info("inverted", TensorProto.FLOAT, ["N", "H", "W"])
    c = helper.make_tensor("c", TensorProto.FLOAT, [], [4095.0])
    node = helper.make_node("Sub", ["c", "image"], ["inverted"])
    graph = helper.make_graph([node], "invert", [x], [y], initializer=[c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / f"{MODEL_NAME}.onnx"
    onnx.save(model, path)
    manifest = {
        "name": MODEL_NAME,
        "version": "1.0.0",
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "inputs": [{"name": "image", "shape": ["N", "H", "W"], "dtype": "float32"}],
        "outputs": [{"name": "inverted", "shape": ["N", "H", "W"], "dtype": "float32"}],
        "preprocessing": {"max_value": 4095},
        "training": {"command": "none: analytic test model"},
        "metrics": {},
    }
    (folder / f"{MODEL_NAME}.json").write_text(json.dumps(manifest, indent=1))
    return path


class InvertPipeline:
    """Inverts every MR image of a series into a derived series."""

    name = "test-invert"

    def selects(self, series: SeriesInfo) -> Selection:
        if series.modality != "MR":
            return Selection(False, f"modality {series.modality!r} is not MR")
        return Selection(True, "MR series")

    def models(self) -> Sequence[ModelSpec]:
        return [ModelSpec(MODEL_NAME)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        opts = ctx.options
        if "REJECT" in str(series.first("SeriesDescription", "")):
            raise InputError("series description asks for rejection")
        fail_times = int(opts.get("fail_times", 0))
        if fail_times:
            counter = ctx.workdir / "attempts"
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n < fail_times:
                raise RuntimeError(f"simulated transient failure {n + 1}/{fail_times}")
        time.sleep(float(opts.get("sleep_seconds", 0)))
        session = ctx.sessions[MODEL_NAME]
        out = []
        for k, inst in enumerate(series.sorted_by_position()):
            ds = inst.dataset()
            arr = ds.pixel_array.astype(np.float32)
            (inv,) = session.run(None, {"image": arr.reshape((-1,) + arr.shape[-2:])})
            pixels = np.clip(inv.reshape(arr.shape), 0, 4095).astype(np.uint16)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPInstanceUID = ctx.uid(f"instance/{inst.sop_instance_uid}")
            ds.SeriesInstanceUID = ctx.uid("series")
            ds.SeriesNumber = 9000 + int(ds.get("SeriesNumber") or 0) % 1000
            ds.SeriesDescription = f"INVERTED {ds.get('SeriesDescription', '')}"[:64]
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.InstanceNumber = k + 1
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = pixels.tobytes()
            if "WindowCenter" in ds:
                # The source's window, mirrored with the pixels; as it was, the viewer showed white.
                centres = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
                ds.WindowCenter = [f"{4095 - float(c):g}" for c in centres]
            ds.Manufacturer = ctx.identity.manufacturer
            ds.SoftwareVersions = ctx.identity.software_version
            out.append(ds)
            ctx.progress((k + 1) / series.instance_count, "inverted")
        return out

    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file

        src = dcmread(str(get_testdata_file("MR_small.dcm")))
        folder.mkdir(parents=True, exist_ok=True)
        src.SeriesInstanceUID = f"2.25.{seed}1"
        src.SOPInstanceUID = f"2.25.{seed}2"
        path = folder / "mr.dcm"
        src.save_as(path)
        return [path]


def factory() -> InvertPipeline:
    return InvertPipeline()
