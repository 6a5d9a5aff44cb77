"""UID checks and deterministic UID derivation.

Every path the gateway builds from a DICOM value goes through
:func:`checked_uid` first: a UID is digits and dots, at most 64 characters,
with no empty or zero-padded components (PS3.5 9.1), so it can never contain
``/``, ``..`` or other path syntax.
"""

from __future__ import annotations

import hashlib
import re
import uuid

__all__ = ["InvalidUID", "checked_uid", "derived_uid", "is_valid_uid", "short_ref"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Namespace of this product for UUID5-derived UIDs; fixed forever so that a job
# run twice (after a crash) yields the same UIDs (PS3.5 B.2, "2.25." form).
_NAMESPACE = uuid.UUID("6d1c0a8e-3f5b-5a57-9d0e-5c1e2a7b4f10")


class InvalidUID(ValueError):
    """A value that should be a UID is not one; it is never used in a path."""


def is_valid_uid(value: object) -> bool:
    """True if ``value`` is a syntactically valid UID (PS3.5 9.1)."""
    # fullmatch, not match: ``$`` also matches before a final newline, which let "1.2.3\n" through.
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def checked_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` as a string if it is a valid UID, else raise InvalidUID.

    The message names the attribute, not the value, because an attacker-chosen
    or malformed value has no place in logs.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = str(value).strip("\x00 ") if value is not None else ""
    if not is_valid_uid(value):
        raise InvalidUID(f"{what} is not a valid UID (digits and dots, at most 64 characters)")
    return value


def derived_uid(*parts: object) -> str:
    """A UID that depends only on ``parts``: ``2.25.<integer of UUID5(parts)>``."""
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def short_ref(uid: str) -> str:
    """A short, non-reversible reference to a UID for logs (never the UID itself)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]
