"""aigw: an open-source DICOM AI gateway.

Receives studies over DICOM (C-STORE), stores every instance durably and
bit-exact, decides when a series is complete, routes it to pipeline plugins
that run ONNX models, and sends the results back to PACS as standard DICOM.

The public API for plugin authors is :mod:`gateway.contract`; everything else
is the service's own.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aigw")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
