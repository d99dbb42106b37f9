"""What a consumer receives: one JSON object per event, the same on every channel.

::

    {"id": "<event id, a UUID: the same on every delivery>",
     "type": "study.stable",
     "time": "2026-12-07T17:21:08.123456Z",
     "source": "https://pacs.example",
     "sequence": 1234,
     "study": "1.2.840....",
     "resource": "ImagingStudy/...",
     "links": {"fhir": "https://pacs.example/fhir/ImagingStudy/...",
               "dicomweb": "https://pacs.example/dicom-web/studies/1.2.840...."},
     "data": {...},
     "patient": {"id": "..."}}

``sequence`` is the event's position in the outbox: it grows with each event, so that a
consumer can order the events of one study (they are delivered in that order). ``patient``
only with the ``events.include_phi`` setting. Never pixel data.

Webhooks are signed (:func:`signature`), as Stripe and GitHub sign theirs: the header
``X-Pacsbridge-Signature: sha256=<hex>`` holds HMAC-SHA256 with the subscription's secret
over ``<X-Pacsbridge-Timestamp>.<body>`` (the Unix time in seconds, a dot, the raw body
bytes). A receiver recomputes it, compares in constant time, and refuses timestamps older
than a few minutes (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from archive.subscriptions import EventRecord


@dataclass(frozen=True, slots=True)
class Envelope:
    """How envelopes are built in this process."""

    source: str
    fhir_base: str | None = None
    dicomweb_base: str | None = None
    include_phi: bool = False

    def build(self, event: EventRecord) -> dict[str, Any]:
        return envelope(
            event,
            source=self.source,
            fhir_base=self.fhir_base,
            dicomweb_base=self.dicomweb_base,
            include_phi=self.include_phi,
        )

    def encode(self, event: EventRecord) -> bytes:
        return json.dumps(
            self.build(event), separators=(",", ":"), ensure_ascii=False, default=str
        ).encode("utf-8")


def envelope(
    event: EventRecord,
    *,
    source: str,
    fhir_base: str | None = None,
    dicomweb_base: str | None = None,
    include_phi: bool = False,
) -> dict[str, Any]:
    """The JSON object of one event."""
    links: dict[str, str] = {}
    if event.resource and fhir_base:
        links["fhir"] = f"{fhir_base.rstrip('/')}/{event.resource}"
    if event.study_instance_uid and dicomweb_base:
        links["dicomweb"] = f"{dicomweb_base.rstrip('/')}/studies/{event.study_instance_uid}"
    body: dict[str, Any] = {
        "id": event.event_id,
        "type": event.type,
        "time": event.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "source": source,
        "sequence": event.id,
        "study": event.study_instance_uid,
        "resource": event.resource,
        "links": links,
        "data": event.data,
    }
    if include_phi and event.patient_id:
        body["patient"] = {"id": event.patient_id}
    return body


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Pacsbridge-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of
    ``timestamp + "." + body`` keyed with ``secret``."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` at ``timestamp`` (constant time)."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)
