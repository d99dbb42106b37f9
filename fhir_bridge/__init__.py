"""FHIR R4 bridge: patients, imaging studies, reports and AI findings as FHIR R4 (4.0.1)
resources under ``/fhir``, views of the archive (the single record); reports written here are
stored as DICOM SR documents."""

from fhir_bridge.errors import FHIRError
from fhir_bridge.rest import PREFIX, outcome_response
from fhir_bridge.router import router

__all__ = ["PREFIX", "FHIRError", "outcome_response", "router"]
