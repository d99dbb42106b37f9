"""UIDs of AI results."""

from __future__ import annotations

import uuid


def derived_uid(run_uid: str, purpose: str) -> str:
    """A UID of the 2.25 form (PS3.5 B.2) derived from a run's UID: the same run always
    produces objects with the same UIDs."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{run_uid}/{purpose}').int}"
