"""The template pipeline: inverts MR images with a tiny ONNX model (used by the tests).

Copy this folder to start a new pipeline. It has the shape every pipeline in
``pipelines/`` has, module for module:

``pipeline.py``
    the plugin class: name, options model, selector, models, run (a short
    orchestration of the next three), demo hook;
``options.py``
    the ``[pipelines.<name>]`` table as a typed model (validated at start);
``preprocess.py``
    series to arrays;
``infer.py``
    arrays to results through the ONNX sessions the gateway made;
``dicom.py``
    results to DICOM datasets that reference their sources;
``lab/``
    what never runs in the service: here the model builder; in real
    pipelines also the network, training, benchmarks and data generators.

Register the class as an entry point (``aigw.pipelines``) or, as the tests
do, with ``plugins = ["tests.plugins.invert:InvertPipeline"]``.

It exercises the whole contract (selector, declared model, sessions,
deterministic UIDs, derived DICOM out) and has knobs for failure tests: see
:class:`~tests.plugins.invert.options.InvertOptions`; a series whose
SeriesDescription contains ``REJECT`` fails with InputError, one with
``CRASH`` kills the process running it, and one with ``HANG`` runs for
``HANG_SECONDS``.
"""

from tests.plugins.invert.options import InvertOptions
from tests.plugins.invert.pipeline import InvertPipeline

__all__ = ["InvertOptions", "InvertPipeline"]
