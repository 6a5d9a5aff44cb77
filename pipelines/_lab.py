"""What every pipeline's ``lab/`` shares: ONNX export and its check, CPU sessions, manifests.

Lab code (networks, training, benchmarks, generators, model-card writers)
never runs in the service. It is the one part of ``pipelines/`` that may
import more of the gateway than :mod:`gateway.contract`, and only through
this module: :mod:`gateway.models` is where the service makes sessions and
reads manifests, so a benchmark times the same kind of session a job gets,
and a manifest written here is validated by the class that will load it.

torch and onnx are imported inside the functions that need them, so
benchmarks that only run exported models work without the training extra.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.models import ModelManifest, open_session
from gateway.storage import sha256_file

if TYPE_CHECKING:
    import torch

__all__ = ["OPSET", "cpu_session", "export_onnx", "onnx_io", "sha256_file", "write_manifest"]

#: ONNX opset of every exported model: plain, widely supported operators.
OPSET = 17


def cpu_session(path: str | Path, threads: int | None = 1) -> Any:
    """An ONNX Runtime session on the CPU with a fixed thread count (benchmarks, checks, tests).

    One thread by default so that figures compare between machines; pass
    None for ONNX Runtime's default of one thread per core.
    """
    return open_session(path, ("CPUExecutionProvider",), threads=threads)


def export_onnx(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> None:
    """Export ``module`` in eval mode to ``path`` at :data:`OPSET` and check the graph.

    Parameters
    ----------
    module : torch.nn.Module
        The trained network (put in eval mode here).
    example : sequence of torch.Tensor
        Inputs of the right dtype and rank; their sizes are free along ``dynamic_axes``.
    path : pathlib.Path
        Destination ``.onnx`` file.
    input_names, output_names : sequence of str
        Tensor names the pipeline's ``infer.py`` feeds and reads.
    dynamic_axes : mapping
        Tensor name -> {axis: symbolic name}, for example ``{"tiles": {0: "N"}}``.
    """
    import onnx
    import torch

    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript and
        # gives a small, plain opset-17 graph; its warning is expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            tuple(example),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=OPSET,
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))


def onnx_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph as manifest entries (name, shape with symbolic axes, dtype)."""
    import onnx

    graph = onnx.load(str(path)).graph

    def entries(values: Sequence[Any]) -> list[dict[str, Any]]:
        out = []
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            out.append({"name": v.name, "shape": dims, "dtype": dtype})
        return out

    return entries(list(graph.input)), entries(list(graph.output))


def write_manifest(model: Path, manifest: Path, name: str, version: str, **fields: Any) -> dict[str, Any]:
    """Write ``manifest``, the machine-readable model card of ``model``, and return its content.

    ``file``, ``sha256``, ``inputs`` and ``outputs`` are read off the model
    file; ``fields`` (preprocessing constants, training provenance, held-out
    metrics, ...) follow in the order given. The result is validated with
    :class:`gateway.models.ModelManifest` before it is written, so the
    service never meets a manifest that the lab wrote and it cannot load.
    """
    inputs, outputs = onnx_io(model)
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "file": model.name,
        "sha256": sha256_file(model),
        "inputs": inputs,
        "outputs": outputs,
        **fields,
    }
    ModelManifest.model_validate(data)
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    return data
