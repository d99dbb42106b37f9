"""What a request's handlers share: the archive, the settings and the URLs of this server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from archive import Archive
from config import Settings
from fhir_bridge.change_audit import ChangeAudit

if TYPE_CHECKING:
    from fhir_bridge.provider import Provider


@dataclass(frozen=True, slots=True)
class Context:
    archive: Archive
    settings: Settings
    base: str
    """The FHIR base URL (absolute)."""
    dicomweb: str
    """The DICOMweb root (absolute), for Endpoint.address."""
    providers: dict[str, Provider]
    actor: str = "fhir"
    """Who makes the request, for the audit of money: the token's subject (``user:<name>``,
    ``client:<name>``), else ``fhir``."""
    minimal: bool = False
    """The request asked ``Prefer: return=minimal``: a write need not load what it wrote."""
    compartment: str | None = None
    """The Patient id whose compartment holds the request (a token's ``patient/`` scopes):
    every search, read and include sees that patient's resources only."""
    audit: ChangeAudit | None = None
    """The writer of the request, for the audit event a write commits with its change."""

    def url(self, resource_type: str, resource_id: str) -> str:
        return f"{self.base}/{resource_type}/{resource_id}"
