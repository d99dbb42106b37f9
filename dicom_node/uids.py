"""UID validation in pynetdicom, done once per distinct UID.

pynetdicom converts and validates every UID it decodes or sets (``pynetdicom.utils.set_uid``:
a regular expression for the VR, another for conformance, a new ``pydicom.uid.UID``). An
A-ASSOCIATE-RQ from a storage or retrieve SCU (DCMTK's ``getscu`` and ``storescu -R`` among
them) proposes a hundred presentation contexts and as many role selections: about 1,300 UIDs,
and about 10 ms of CPU per association on this path alone. The same few hundred UIDs come back
in every association, so a UID that validated once is returned from a table afterwards.

The transfer syntaxes of each proposed presentation context go through
``PresentationContext.add_transfer_syntax``, which validates and classifies each one again
(four regular expressions): those that pass every check without a warning are remembered too.

Only successful validations are remembered: an invalid or non-conformant UID still raises or
logs every time, exactly as before. What is remembered holds for pynetdicom's validation
settings (``_config.VALIDATORS["UI"]``, ``_config.ENFORCE_UID_CONFORMANCE``) at the time: when
either changes, the tables start afresh.

Nothing changes in pynetdicom until :func:`install` runs (``dicom_node.patches.install``).
"""

from __future__ import annotations

from typing import Any

import pynetdicom.ae
import pynetdicom.dimse_primitives
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.presentation import PresentationContext

#: Bounded: association requests may carry arbitrary private UIDs.
MAX_REMEMBERED = 50_000

_original_set_uid = pynetdicom.utils.set_uid
_validated: dict[Any, UID] = {}
_clean_transfer_syntaxes: dict[Any, UID] = {}
#: pynetdicom's UID validation settings the tables were filled under.
_filled_validator: Any = None
_filled_enforce: bool | None = None


def _check_settings() -> None:
    """Empty the tables when pynetdicom's UID validation settings are no longer those they
    were filled under."""
    global _filled_validator, _filled_enforce
    validator = _config.VALIDATORS.get("UI")
    enforce = _config.ENFORCE_UID_CONFORMANCE
    if validator is not _filled_validator or enforce is not _filled_enforce:
        _validated.clear()
        _clean_transfer_syntaxes.clear()
        _filled_validator, _filled_enforce = validator, enforce


def set_uid(
    value: str | bytes | UID | None,
    name: str,
    allow_empty: bool = True,
    allow_none: bool = True,
    validate: bool = True,
) -> UID | None:
    """``pynetdicom.utils.set_uid`` for validated UIDs, remembering those that pass."""
    if validate and value and isinstance(value, str | bytes):
        _check_settings()
        known = _validated.get(value)
        if known is not None:
            return known
        result = _original_set_uid(value, name, allow_empty, allow_none, validate)
        if result is not None and result.is_valid and len(_validated) < MAX_REMEMBERED:
            _validated[value] = result
        return result
    return _original_set_uid(value, name, allow_empty, allow_none, validate)


_original_add_transfer_syntax = PresentationContext.add_transfer_syntax


def add_transfer_syntax(self: PresentationContext, syntax: str | bytes | UID | None) -> None:
    """``PresentationContext.add_transfer_syntax`` for transfer syntaxes that passed before."""
    if not isinstance(syntax, str | bytes):
        _original_add_transfer_syntax(self, syntax)
        return
    _check_settings()
    known = _clean_transfer_syntaxes.get(syntax)
    if known is not None:
        if known not in self._transfer_syntax:
            self._transfer_syntax.append(known)
        return
    _original_add_transfer_syntax(self, syntax)
    uid = UID(syntax.decode("ascii") if isinstance(syntax, bytes) else syntax)
    if (
        uid
        and pynetdicom.utils.validate_uid(uid)
        and uid.is_valid
        and (uid.is_private or uid.is_transfer_syntax)
        and len(_clean_transfer_syntaxes) < MAX_REMEMBERED
    ):
        _clean_transfer_syntaxes[syntax] = uid


def install() -> None:
    """Route every pynetdicom module's ``set_uid`` through the table (part of
    ``dicom_node.patches.install()``)."""
    for module in (
        pynetdicom.utils,
        pynetdicom.ae,
        pynetdicom.dimse_primitives,
        pynetdicom.pdu_items,
        pynetdicom.pdu_primitives,
        pynetdicom.presentation,
    ):
        module.set_uid = set_uid  # type: ignore[attr-defined]
    PresentationContext.add_transfer_syntax = add_transfer_syntax  # type: ignore[method-assign]
