"""Named DIMSE status codes and association rejection reasons.

Storage statuses follow PS3.4 Annex B.2.3, Verification PS3.4 A.4.2 and
association rejections PS3.8 9.3.4 (A-ASSOCIATE-RJ result, source, reason)
and the listener's aborts PS3.8 9.3.8 (A-ABORT source, reason).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

__all__ = ["Abort", "AbortReason", "Rejection", "RejectReason", "StorageStatus", "is_transient_store_status"]


class StorageStatus(IntEnum):
    """C-STORE response statuses (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    #: Refused: out of resources (no space left, instance too large for this node).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (unparseable data set).
    CANNOT_UNDERSTAND = 0xC000
    #: Processing failure (PS3.7 C.4.2): invalid header / UID.
    PROCESSING_FAILURE = 0x0110
    #: Refused: SOP class not supported (PS3.7 9.1.1.1.9, C.5.x).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Failure: cannot understand, used for undecodable data sets (0xC210-class).
    CANNOT_DECODE = 0xC210
    #: Failure: unexpected error in our own handler (pynetdicom's convention).
    UNEXPECTED_ERROR = 0xC211
    #: Warning: data set elements were coerced (never used: we never coerce).
    COERCION_OF_DATA_ELEMENTS = 0xB000


def is_transient_store_status(status: int) -> bool:
    """True for statuses worth retrying later: 0xA7xx out of resources."""
    return 0xA700 <= status <= 0xA7FF


class Rejection(NamedTuple):
    """An A-ASSOCIATE-RJ (result, source, diagnostic) triple with a metric label."""

    result: int
    source: int
    diagnostic: int
    label: str


class RejectReason:
    """Rejections the association policy can give (PS3.8 Table 9-21)."""

    CALLING_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x03, "calling_ae_not_recognised")
    CALLED_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x07, "called_ae_not_recognised")
    ADDRESS_NOT_ALLOWED = Rejection(0x01, 0x01, 0x01, "address_not_allowed")
    TOO_MANY_ASSOCIATIONS = Rejection(0x02, 0x03, 0x02, "local_limit_exceeded")
    # The front door's (gateway/frontdoor.py): checked on the connection or the
    # raw A-ASSOCIATE-RQ, before pynetdicom sees it.
    TOO_MANY_CONNECTIONS = Rejection(0x02, 0x03, 0x02, "connection_limit")
    TOO_MANY_FROM_ADDRESS = Rejection(0x02, 0x03, 0x02, "address_connection_limit")
    PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(0x01, 0x02, 0x02, "protocol_version_not_supported")

    ALL = (
        CALLING_AE_NOT_RECOGNISED,
        CALLED_AE_NOT_RECOGNISED,
        ADDRESS_NOT_ALLOWED,
        TOO_MANY_ASSOCIATIONS,
        TOO_MANY_CONNECTIONS,
        TOO_MANY_FROM_ADDRESS,
        PROTOCOL_VERSION_NOT_SUPPORTED,
    )


class Abort(NamedTuple):
    """How the listener ends a connection it will not serve, with a metric label.

    ``source`` and ``reason`` are the A-ABORT PDU's fields (PS3.8 Table 9-26);
    both ``None`` means the transport connection is closed without a PDU, as
    PS3.8 9.2 action AA-2 does when ARTIM expires.
    """

    source: int | None
    reason: int | None
    label: str


class AbortReason:
    """Aborts the listener's front door gives (PS3.8 9.2 action AA-1, Table 9-26).

    Source 2 is the DICOM UL service-provider; the reasons are 1
    unrecognized-PDU, 2 unexpected-PDU, 4 unrecognized-PDU-parameter and 6
    invalid-PDU-parameter-value.
    """

    UNRECOGNISED_PDU = Abort(0x02, 0x01, "unrecognised_pdu")
    UNEXPECTED_PDU = Abort(0x02, 0x02, "unexpected_pdu")
    UNRECOGNISED_ITEM = Abort(0x02, 0x04, "malformed_request")
    MALFORMED_REQUEST = Abort(0x02, 0x06, "malformed_request")
    PDU_TOO_LARGE = Abort(0x02, 0x06, "pdu_too_large")
    ARTIM_EXPIRED = Abort(None, None, "artim_expired")
    #: The TLS port's handshake failed (PS3.15 B.9): no DICOM was spoken, so no PDU, only a close.
    TLS_HANDSHAKE_FAILED = Abort(None, None, "tls_handshake_failed")
    #: An established association sent no PDU, or not all of one, within ``idle_timeout_seconds``
    #: (reason 0, reason-not-specified: PS3.8 has no idle timer, so no reason names it).
    IDLE_TIMEOUT = Abort(0x02, 0x00, "idle_timeout")
    #: A data set refused while it streamed (size, space) went on past ``max_instance_bytes``
    #: more: reading it to its end to answer 0xA700 would cost the network unbounded.
    DATA_SET_TOO_LARGE = Abort(0x02, 0x00, "data_set_too_large")

    ALL = (
        UNRECOGNISED_PDU,
        UNEXPECTED_PDU,
        UNRECOGNISED_ITEM,
        MALFORMED_REQUEST,
        PDU_TOO_LARGE,
        ARTIM_EXPIRED,
        TLS_HANDSHAKE_FAILED,
        IDLE_TIMEOUT,
        DATA_SET_TOO_LARGE,
    )
