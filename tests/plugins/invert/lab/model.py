"""The template's model, built analytically (a real pipeline trains it in ``lab/train.py``)."""

from __future__ import annotations

from pathlib import Path

from pipelines._lab import OPSET, write_manifest
from tests.plugins.invert.infer import MODEL_NAME

__all__ = ["MODEL_NAME", "build_model", "demo_study"]


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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    path = folder / f"{MODEL_NAME}.onnx"
    onnx.save(model, path)
    write_manifest(
        path,
        folder / f"{MODEL_NAME}.json",
        MODEL_NAME,
        "1.0.0",
        preprocessing={"max_value": 4095},
        training={"command": "none: analytic test model"},
        metrics={},
    )
    return path


def demo_study(folder: Path, seed: int) -> list[Path]:
    """One MR image from pydicom's test data, with UIDs of its own."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    src = dcmread(str(get_testdata_file("MR_small.dcm")))
    folder.mkdir(parents=True, exist_ok=True)
    src.SeriesInstanceUID = f"2.25.{seed}1"
    src.SOPInstanceUID = f"2.25.{seed}2"
    path = folder / "mr.dcm"
    src.save_as(path)
    return [path]
