"""Prebuilt P-DATA-TF PDUs (PS3.8 9.3.5): fragments reassemble to the message, every PDU within
the peer's maximum length, the last fragment flagged."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.pdata import c_store_command, pdata_pdus


def _parse(stream: bytes) -> list[tuple[int, int, bytes, int]]:
    """(context id, control header, fragment, PDU variable-field length) per PDU."""
    out, offset = [], 0
    while offset < len(stream):
        pdu_type, _reserved, length = struct.unpack(">BBL", stream[offset : offset + 6])
        assert pdu_type == 0x04
        body = stream[offset + 6 : offset + 6 + length]
        item_length = struct.unpack(">L", body[:4])[0]
        assert item_length == length - 4  # one PDV per PDU
        out.append((body[4], body[5], body[6 : 4 + item_length], length))
        offset += 6 + length
    return out


@pytest.mark.parametrize("max_pdu", [16384, 4096, 0])
def test_fragments_reassemble_within_the_maximum_length(max_pdu: int):
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = "1.2.3.4.5"
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    req.MoveOriginatorMessageID = 3
    command = c_store_command(req)
    data = bytes(range(256)) * 2000  # 512000 bytes
    pdus = _parse(pdata_pdus(5, command, data, max_pdu))
    assert all(cx == 5 for cx, *_ in pdus)
    if max_pdu:
        assert all(length <= max_pdu for *_, length in pdus)
    commands = [p for p in pdus if p[1] & 0x01]
    datasets = [p for p in pdus if not p[1] & 0x01]
    assert b"".join(f for _, _, f, _ in commands) == command
    assert b"".join(f for _, _, f, _ in datasets) == data
    assert [p[1] & 0x02 for p in commands] == [0] * (len(commands) - 1) + [2]
    assert [p[1] & 0x02 for p in datasets] == [0] * (len(datasets) - 1) + [2]
    # The command set: group length first, Command Field C-STORE-RQ, originator fields.
    assert command[:4] == b"\x00\x00\x00\x00"
    assert struct.unpack("<L", command[8:12])[0] == len(command) - 12
    assert b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00" in command  # (0000,0100) = 0x0001
    assert b"MOVESCU " in command


def test_pending_c_find_response_command():
    from pynetdicom.dimse_primitives import C_FIND

    from dicom_node.pdata import c_find_pending_command

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    rsp.Status = 0xFF00
    command = c_find_pending_command(rsp)
    assert struct.unpack("<L", command[8:12])[0] == len(command) - 12
    assert b"\x00\x00\x00\x01\x02\x00\x00\x00\x20\x80" in command  # C-FIND-RSP
    assert b"\x00\x00\x20\x01\x02\x00\x00\x00\x09\x00" in command  # responding to 9
    assert b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\xff" in command  # status 0xFF00


def _pynetdicom_command(primitive) -> bytes:
    from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
    from pynetdicom.dsutils import encode

    message_class = {C_FIND: C_FIND_RSP, C_GET: C_GET_RSP, C_MOVE: C_MOVE_RSP}.get(
        type(primitive), C_STORE_RSP
    )
    message = message_class()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


@pytest.mark.parametrize("kind", ["find", "get", "move"])
@pytest.mark.parametrize("status", [0xFF00, 0x0000, 0xFE00, 0xB000])
def test_query_responses_are_what_pynetdicom_encodes(kind: str, status: int):
    """The prebuilt C-FIND/C-GET/C-MOVE response command sets equal pynetdicom's encoding."""
    from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE

    from dicom_node.pdata import query_response_command

    rsp: Any = {"find": C_FIND, "get": C_GET, "move": C_MOVE}[kind]()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    rsp.Status = status
    if kind != "find":
        rsp.NumberOfRemainingSuboperations = 12 if status == 0xFF00 else None
        rsp.NumberOfCompletedSuboperations = 3
        rsp.NumberOfFailedSuboperations = 1
        rsp.NumberOfWarningSuboperations = 0
    assert query_response_command(rsp, identifier=False) == _pynetdicom_command(rsp)


def test_store_response_is_what_pynetdicom_encodes():
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.pdata import c_store_response_command

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 11
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1506.5.1"
    rsp.Status = 0x0000
    assert c_store_response_command(rsp) == _pynetdicom_command(rsp)


def _store_response(status: int, message_id: int = 11, **optional: Any) -> Any:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1506.5.1"
    rsp.Status = status
    for keyword, value in optional.items():
        setattr(rsp, keyword, value)
    return rsp


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC123])
def test_plain_store_response_status_reads_pynetdicom_encoding(status: int):
    """The C-STORE-RSP reader of leased sub-operations (dicom_node.retrieve) takes what
    pynetdicom (as a Storage SCP) sends, in one PDU, and gives its Status."""
    from dicom_node.pdata import plain_store_response_status

    pdu = pdata_pdus(3, _pynetdicom_command(_store_response(status)), None, 16384)
    assert plain_store_response_status(pdu, 11) == status


def test_plain_store_response_status_leaves_the_rest_to_pynetdicom():
    """Anything but a plain response to the message in flight: None (pynetdicom decodes it)."""
    from pynetdicom.dimse_primitives import C_CANCEL

    from dicom_node.pdata import plain_store_response_status

    plain = _pynetdicom_command(_store_response(0x0000))
    # Another message ID.
    assert plain_store_response_status(pdata_pdus(3, plain, None, 16384), 12) is None
    # Optional status fields (PS3.7 C.4.1, C.4.2).
    with_comment = _pynetdicom_command(_store_response(0xB000, ErrorComment="coerced"))
    assert plain_store_response_status(pdata_pdus(3, with_comment, None, 16384), 11) is None
    # The command split over two PDUs.
    assert plain_store_response_status(pdata_pdus(3, plain, None, 40), 11) is None
    # A C-CANCEL-RQ for the retrieve.
    from pynetdicom.dimse_messages import C_CANCEL_RQ
    from pynetdicom.dsutils import encode

    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 11
    message = C_CANCEL_RQ()
    message.primitive_to_message(cancel)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    assert plain_store_response_status(pdata_pdus(1, encoded, None, 16384), 11) is None
    # Not a P-DATA-TF PDU: an A-RELEASE-RQ; truncated input.
    assert plain_store_response_status(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00", 11) is None
    assert plain_store_response_status(pdata_pdus(3, plain, None, 16384)[:-3], 11) is None


def test_part10_data_set_offset_matches_pynetdicom(tmp_path):
    """Where a leased sub-operation starts sending a stored file: the same offset pynetdicom's
    own chunked sending finds."""
    from pynetdicom.dsutils import split_dataset

    from archive.dicom import part10_data_set_offset
    from tests.dicom_factory import ct_slice

    path = tmp_path / "ct.dcm"
    ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=0, size=8).save_as(
        path, enforce_file_format=True
    )
    data = path.read_bytes()
    assert part10_data_set_offset(data) == split_dataset(path)[1]
    assert part10_data_set_offset(data[128:]) is None  # no preamble
    assert part10_data_set_offset(data[:130]) is None
    # A File Meta group length that stops short of the group's end.
    short = bytearray(data)
    short[140:144] = (int.from_bytes(data[140:144], "little") - 26).to_bytes(4, "little")
    assert part10_data_set_offset(bytes(short)) is None
