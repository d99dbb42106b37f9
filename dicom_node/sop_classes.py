"""Which SOP classes the node serves."""

from __future__ import annotations

from functools import cache

from pynetdicom import sop_class


@cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP Class pynetdicom knows (PS3.4 B.5): images, SR, SEG, PDF, video…"""
    return tuple(sorted({str(uid) for uid in sop_class._STORAGE_CLASSES.values()}))
