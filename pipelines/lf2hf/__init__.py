"""Low-field to high-field MRI translation.

A compact conditioned residual U-Net turns a low-field (0.05 to 0.55 T)
spin-echo T1- or T2-weighted slice into a 3 T-like slice at twice the
in-plane matrix: contrast adaptation, denoising and 2x super-resolution in
one pass. The enhanced image is a reading aid: it never replaces the
acquired image, and :func:`pipelines.lf2hf.infer.degrade` checks every
output slice against the acquired one.

What runs in the service (numpy and onnxruntime, no torch, no scipy):
:mod:`~pipelines.lf2hf.pipeline` (selector and run),
:mod:`~pipelines.lf2hf.options`, :mod:`~pipelines.lf2hf.preprocess`,
:mod:`~pipelines.lf2hf.infer` and :mod:`~pipelines.lf2hf.dicom`.
:mod:`pipelines.lf2hf.lab` holds the rest: the network, its training, the
physics-based simulator on the MNI152 2009 template that makes the training
and evaluation data, and the held-out benchmark against bicubic and
non-local-means baselines.
"""
