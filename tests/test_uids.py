"""pynetdicom's UID validation, remembered per distinct UID (dicom_node/uids.py): the same
results as pynetdicom's own, warnings and errors included, every time."""

from __future__ import annotations

import logging

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext

from dicom_node import uids

pytestmark = pytest.mark.usefixtures("pynetdicom_patched")  # installs the table


def test_valid_uids_come_back_equal_and_typed():
    for _ in range(2):
        primitive = C_STORE()
        primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        primitive.AffectedSOPInstanceUID = b"1.2.826.0.1.3680043.10.1506.7.1"
        assert primitive.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert isinstance(primitive.AffectedSOPClassUID, UID)
        assert primitive.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.10.1506.7.1"
    assert "1.2.840.10008.5.1.4.1.1.2" in uids._validated


def test_invalid_uids_still_raise_every_time():
    primitive = C_STORE()
    for _ in range(2):
        with pytest.raises(ValueError, match="Affected SOP Class UID"):
            primitive.AffectedSOPClassUID = "1." + "2" * 70  # longer than 64
    assert "1." + "2" * 70 not in uids._validated


def test_non_conformant_uids_still_warn_every_time(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    for _ in range(2):
        primitive = C_STORE()
        primitive.AffectedSOPInstanceUID = "1.2.03.4"  # a leading zero: valid VR, not conformant
    warnings = [r for r in caplog.records if "Non-conformant" in r.getMessage()]
    assert len(warnings) == 2


def test_transfer_syntaxes_once_per_context_and_still_checked(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    for _ in range(2):
        cx = PresentationContext()
        cx.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
        cx.add_transfer_syntax(ExplicitVRLittleEndian)
        cx.add_transfer_syntax(b"1.2.840.10008.1.2.1")
        cx.add_transfer_syntax("1.2.840.10008.1.2")
        assert cx.transfer_syntax == [ExplicitVRLittleEndian, UID("1.2.840.10008.1.2")]
        with pytest.raises(ValueError):
            cx.add_transfer_syntax("1." + "2" * 70)
        cx.add_transfer_syntax("1.2.840.10008.5.1.4.1.1.2")  # a SOP class, not a syntax
    not_syntax = [r for r in caplog.records if "not a transfer syntax" in r.getMessage()]
    assert len(not_syntax) == 2
