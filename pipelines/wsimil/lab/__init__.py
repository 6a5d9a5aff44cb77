"""What the wsi-mil pipeline needs but never runs in the service; never imported by the service.

* :mod:`~pipelines.wsimil.lab.scene`: synthetic H&E slides (a scene in micrometres);
* :mod:`~pipelines.wsimil.lab.wsi`: writes a scene as a DICOM whole-slide pyramid;
* :mod:`~pipelines.wsimil.lab.metrics`: the tiling of synthetic slides and the figures of merit;
* :mod:`~pipelines.wsimil.lab.net`: the encoder and the attention head (torch);
* :mod:`~pipelines.wsimil.lab.train`: training, ONNX export, manifests and the model card;
* :mod:`~pipelines.wsimil.lab.evaluate`: held-out evaluation of the exported models;
* :mod:`~pipelines.wsimil.lab.bench`: the benchmark through real DICOM;
* :mod:`~pipelines.wsimil.lab.synthetic`: the demo slide and its preview.

The runtime modules import nothing from here; the pipeline's demo hooks
import :mod:`~pipelines.wsimil.lab.synthetic` inside the method.
"""
