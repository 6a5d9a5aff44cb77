"""What of the IVIM pipeline is never imported by the service: it makes and checks the model.

``signal``
    the IVIM signal equation, the seeded simulator and the training
    distribution (numpy only);
``net``
    the protocol-conditioned network (torch): a protocol encoder that
    generates a small per-voxel MLP, with a standard deviation per estimate;
``calibration``
    coverage, calibration factors and out-of-range AUROC of those standard
    deviations (numpy only; training, the benchmark and the tests share it);
``train``
    ``python -m pipelines.ivim.lab.train``: trains the network on simulated
    signals and exports it to ONNX;
``bench``
    ``python -m pipelines.ivim.lab.bench``: the held-out benchmark against
    least squares, and the manifest writer;
``bayes``
    ``python -m pipelines.ivim.lab.bayes``: the grid posterior-mean
    (Bayes-optimal) reference for settings A and B, the floor no estimator
    beats on the benchmark's priors;
``synthetic``
    abdominal DWI phantom studies written as DICOM (demo, tests);
``preview``
    the pictures of ``aigw demo``.

Lab modules may import the runtime modules; the runtime imports lab only
inside the demo hooks of :class:`~pipelines.ivim.pipeline.IvimPipeline`.
"""
