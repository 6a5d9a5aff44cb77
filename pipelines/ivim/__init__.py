"""IVIM diffusion pipeline: model side.

Intravoxel incoherent motion (IVIM) maps D, D* and f from multi-b-value
diffusion-weighted signals with a set network trained on simulated signals
(:mod:`pipelines.ivim.net`, trained by :mod:`pipelines.ivim.train`) and with
conventional bounded least-squares baselines (:mod:`pipelines.ivim.fit`).
The synthetic data generator is :mod:`pipelines.ivim.signal`; the held-out
benchmark is :mod:`pipelines.ivim.bench`. Only ``signal`` and ``fit`` are
needed at inference time (numpy and onnxruntime, no torch).
"""
