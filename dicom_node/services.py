"""DIMSE services beyond Verification and Storage, plugged into the node's AE.

Each service adds its presentation contexts to the AE and returns its event handlers; the
node (``DimseServer``) composes them. ``default_services`` is the list a running node serves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pynetdicom import AE

from archive import Archive
from config import Settings

Handler = tuple[Any, Callable[..., Any]]


class DimseService(Protocol):
    def add_contexts(self, ae: AE) -> None:
        """Add the SOP classes this service provides as supported contexts."""

    def handlers(self) -> list[Handler]:
        """``(pynetdicom event, handler)`` pairs to bind on the association server."""


def default_services(archive: Archive, settings: Settings) -> list[DimseService]:
    from dicom_node.find import FindService
    from dicom_node.mpps import MppsService
    from dicom_node.retrieve import RetrieveService

    services: list[DimseService] = [FindService(archive, settings)]
    services.append(RetrieveService(archive, settings))
    services.append(MppsService(archive, settings))
    return services
