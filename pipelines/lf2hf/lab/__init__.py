"""What lf2hf needs off the service, never imported by the service.

* :mod:`.simulator`: low-field and 3 T spin-echo slices on the MNI152 anatomy;
* :mod:`.net`: the conditioned residual U-Net (torch);
* :mod:`.train`: training and ONNX export (``python -m pipelines.lf2hf.lab.train``);
* :mod:`.bench`: the held-out benchmark and the manifest writer
  (``python -m pipelines.lf2hf.lab.bench``);
* :mod:`.metrics`: the benchmark's image-quality figures;
* :mod:`.synthetic`: the demo's synthetic DICOM series and its preview.

The lab imports the runtime modules (:mod:`pipelines.lf2hf.preprocess`,
:mod:`pipelines.lf2hf.infer`) so that training, benchmark and service
prepare slices with the same code; the runtime imports nothing from here
except inside the pipeline's demo hooks.
"""
