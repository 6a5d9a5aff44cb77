"""DICOMweb: the STOW-RS receiver (PS3.18 10.5), a second transport of :mod:`gateway.ingest`.

``multipart`` parses request bodies as they stream in, ``stow`` turns parts
into ingested instances and the Store Instances response, ``server`` is the
HTTP side (routes, bearer tokens, uvicorn in the service's process).
"""

from gateway.dicomweb.server import DicomWebServer, hash_token
from gateway.dicomweb.store import FAILURE_REASON_FOR_REFUSAL, FailureReason, WarningReason

__all__ = ["FAILURE_REASON_FOR_REFUSAL", "DicomWebServer", "FailureReason", "WarningReason", "hash_token"]
