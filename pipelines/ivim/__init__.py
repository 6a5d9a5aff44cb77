"""IVIM diffusion pipeline: D, D*, f and S0 maps from multi-b-value diffusion-weighted MR.

Intravoxel incoherent motion (IVIM) maps are estimated by a network
trained on simulated signals (run by onnxruntime) or by bounded least
squares. The package has the shape every pipeline in ``pipelines/`` has:

``pipeline.py``
    the plugin class: selector, models, run, demo hooks;
``options.py``
    ``[pipelines.ivim]`` as :class:`~pipelines.ivim.options.IvimOptions`;
``preprocess.py``
    DWI series to a trace-weighted volume, b-values and background mask;
``infer.py``
    the estimators (network and least squares) and the voxel loop;
``dicom.py``
    maps to Parametric Maps and derived MR series;
``lab/``
    what never runs in the service: the network, its training, the
    simulator, the held-out benchmark, the phantom studies and the demo
    pictures (torch only there).
"""

from pipelines.ivim.options import IvimOptions
from pipelines.ivim.pipeline import IvimPipeline

__all__ = ["IvimOptions", "IvimPipeline"]
