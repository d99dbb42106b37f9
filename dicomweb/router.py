"""The ``/dicom-web`` router: every DICOMweb service module's routes under one prefix."""

from __future__ import annotations

from fastapi import APIRouter

from dicomweb import qido, rendered, stow, wado
from dicomweb.common import PREFIX

__all__ = ["PREFIX", "SERVICES", "router"]

#: Service modules, each with a ``router``. Order matters only where paths overlap.
SERVICES = (qido, wado, stow, rendered)

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])
for _service in SERVICES:
    router.include_router(_service.router)
