"""Low-field to high-field MRI translation: model side.

A compact conditioned residual U-Net (:mod:`pipelines.lf2hf.net`, trained by
:mod:`pipelines.lf2hf.train`) turns a low-field (0.05 to 0.55 T) spin-echo
T1- or T2-weighted slice into a 3 T-like slice at twice the in-plane matrix:
contrast adaptation, denoising and 2x super-resolution in one pass. The
training and evaluation data come from a physics-based simulator on the
MNI152 2009 template (:mod:`pipelines.lf2hf.simulator`); the held-out
benchmark against bicubic and non-local-means baselines is
:mod:`pipelines.lf2hf.bench`.

Only :mod:`pipelines.lf2hf.preprocess`, :mod:`pipelines.lf2hf.infer` and
:mod:`pipelines.lf2hf.metrics` are needed at inference time (numpy and
onnxruntime, no torch, no scipy). The enhanced image is a reading aid: it
never replaces the acquired image, and :func:`pipelines.lf2hf.infer.degrade`
checks every output slice against the acquired one.
"""
