"""The DICOM network edge: a pynetdicom Application Entity in front of the archive."""

from dicom_node.server import DimseServer

__all__ = ["DimseServer"]
