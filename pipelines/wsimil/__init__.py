"""wsi-mil: attention-MIL tumour detection and localisation on H&E whole-slide images.

What runs in the service: :mod:`~pipelines.wsimil.pipeline` (the plugin),
:mod:`~pipelines.wsimil.options`, :mod:`~pipelines.wsimil.preprocess`,
:mod:`~pipelines.wsimil.infer` and :mod:`~pipelines.wsimil.dicom`. The
network, training, evaluation, benchmark and synthetic slides are in
:mod:`pipelines.wsimil.lab`.
"""
