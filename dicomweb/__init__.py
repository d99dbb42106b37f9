"""DICOMweb edge (PS3.18): QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web``.

Routers stay thin over archive services (``archive.query``, ``archive.wado``,
``archive.transcode``, ``archive.Archive.ingest``). Each service is one module with its own
``router``; :data:`router` mounts them all. A new service (rendered, thumbnail…) is a module
with a ``router`` added to ``dicomweb.router.SERVICES``.
"""

from dicomweb.router import router

__all__ = ["router"]
