"""C-STORE requests read off the association's socket (dicom_node.store_receive): the command
set and response as pynetdicom encodes them, and a running node that takes C-STOREs, other
messages, failures, fragments, idle pauses and an abort in the middle of a data set on one
association."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.pdata import c_store_request_command, pdata_pdus
from dicom_node.store_receive import StoreRequest, parse_store_request, pdvs, store_response
from tests.conftest import Backend, RunningServer, start_server
from tests.dicom_factory import ct_slice, write_series
from tests.test_dimse_store import assert_stored_as_sent, blob_count, stats

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SOP_INSTANCE = "1.2.826.0.1.3680043.10.1506.5.1"


def _pynetdicom_command(primitive: Any, request: bool) -> bytes:
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.dsutils import encode

    if isinstance(primitive, C_ECHO):
        message: Any = C_ECHO_RQ()
    else:
        message = C_STORE_RQ() if request else C_STORE_RSP()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


@pytest.mark.parametrize("originator", [False, True])
def test_store_request_of_pynetdicom_is_read(originator: bool):
    req = C_STORE()
    req.MessageID = 513
    req.AffectedSOPClassUID = SOP_CLASS
    req.AffectedSOPInstanceUID = SOP_INSTANCE
    req.Priority = 2
    req.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")  # a data set follows
    if originator:
        req.MoveOriginatorApplicationEntityTitle = "MOVESCU"
        req.MoveOriginatorMessageID = 3
    assert parse_store_request(_pynetdicom_command(req, True)) == StoreRequest(
        513, SOP_CLASS, SOP_INSTANCE
    )


def test_other_command_sets_are_left_to_pynetdicom():
    from pynetdicom.dimse_primitives import C_ECHO

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert parse_store_request(_pynetdicom_command(echo, True)) is None
    command = c_store_request_command(SOP_CLASS, SOP_INSTANCE, message_id=1, priority=0)
    assert parse_store_request(command) == StoreRequest(1, SOP_CLASS, SOP_INSTANCE)
    assert parse_store_request(command[:-3]) is None  # truncated
    # An element the request does not have (Error Comment), or no data set announced.
    extra = command + struct.pack("<HHL", 0, 0x0902, 4) + b"ABCD"
    assert parse_store_request(extra) is None
    no_data = command.replace(b"\x00\x08\x00\x00\x02\x00\x00\x00\x00\x00", b"")
    no_data += struct.pack("<HHLH", 0, 0x0800, 2, 0x0101)
    assert parse_store_request(no_data) is None


@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, ""), (0xA900, "data set SOP Instance differs"), (0xC000, "odd")],
)
def test_store_response_is_what_pynetdicom_encodes(status: int, comment: str):
    rsp: Any = C_STORE()
    rsp.MessageIDBeingRespondedTo = 513
    rsp.AffectedSOPClassUID = SOP_CLASS
    rsp.AffectedSOPInstanceUID = SOP_INSTANCE
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    request = StoreRequest(513, SOP_CLASS, SOP_INSTANCE)
    assert store_response(request, status, comment) == _pynetdicom_command(rsp, False)


def test_pdvs_of_a_pdu():
    command = c_store_request_command(SOP_CLASS, SOP_INSTANCE, message_id=1, priority=0)
    pdu = pdata_pdus(3, command, None, 0)
    assert [(cx, header, bytes(f)) for cx, header, f in pdvs(pdu) or []] == [(3, 3, command)]
    # Two PDVs in one PDU (PS3.8 9.3.5.1 allows several).
    second = struct.pack(">LBB", 6, 3, 0x02) + b"DATA"
    both = bytes([4, 0]) + struct.pack(">L", len(pdu) - 6 + len(second)) + pdu[6:] + second
    assert [(cx, h, bytes(f)) for cx, h, f in pdvs(both) or []] == [
        (3, 3, command),
        (3, 2, b"DATA"),
    ]
    assert pdvs(both[:-1]) is None  # PDU length and content disagree
    assert pdvs(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00") is None  # an A-ABORT


def _ae() -> AE:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _store_contexts() -> list[Any]:
    return [build_context(CTImageStorage, "1.2.840.10008.1.2.1"), build_context(Verification)]


@pytest.fixture
def small_pdu_server(make_backend, tmp_path: Path):
    """A node that receives PDUs of at most 4 KiB: every slice arrives in many fragments."""
    backend: Backend = make_backend(maximum_pdu_size=4096)
    server = start_server(backend, tmp_path)
    yield server
    assert server.stop() == 0, server.log()[-3000:]


def test_stores_echo_idle_and_release_on_one_association(
    small_pdu_server: RunningServer, tmp_path: Path
):
    server = small_pdu_server
    files = write_series(tmp_path / "ct", 6, size=64)
    assoc = _ae().associate(
        "127.0.0.1", server.dimse_port, contexts=_store_contexts(), ae_title=server.ae_title
    )
    assert assoc.is_established
    try:
        for path in files[:2]:
            assert assoc.send_c_store(path).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000  # handed over to pynetdicom
        assert assoc.send_c_store(files[2]).Status == 0x0000
        time.sleep(1.0)  # longer than the reader holds an idle socket
        assert assoc.send_c_store(files[3]).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        for path in files[4:]:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    assert not assoc.is_aborted
    assert stats(server)[3] == len(files)
    assert_stored_as_sent(server, files)


def test_failures_on_the_read_path_answer_with_their_comment(
    server: RunningServer, chunked_send: None, tmp_path: Path
):
    good = write_series(tmp_path / "good", 3)
    # The File Meta (and so the C-STORE request) names another SOP Instance than the data set
    # holds: 0xA900 (PS3.4 B.2.3).
    mismatch = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    mismatch.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mismatch_path = tmp_path / "mismatch.dcm"
    mismatch.preamble = b"\x00" * 128
    mismatch.save_as(mismatch_path, enforce_file_format=False)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good[0].read_bytes()[:-2000])
    assoc = _ae().associate(
        "127.0.0.1", server.dimse_port, contexts=_store_contexts(), ae_title=server.ae_title
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_store(good[0]).Status == 0x0000
        status = assoc.send_c_store(mismatch_path)
        assert status.Status == 0xA900
        assert status.ErrorComment.startswith("data set SOP Instance")
        status = assoc.send_c_store(truncated)
        assert status.Status == 0xC000
        assert status.ErrorComment
        for path in good[1:]:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    assert stats(server)[3] == len(good)
    assert_stored_as_sent(server, good)


def test_abort_in_the_middle_of_a_data_set(server: RunningServer, tmp_path: Path):
    files = write_series(tmp_path / "ct", 2)
    assoc = _ae().associate(
        "127.0.0.1", server.dimse_port, contexts=_store_contexts(), ae_title=server.ae_title
    )
    assert assoc.is_established
    assert assoc.send_c_store(files[0]).Status == 0x0000
    # The next request's command set and half its data set, written to the socket, then an
    # A-ABORT (PS3.8 9.3.8): the node drops the partial instance and ends the association.
    ds = pydicom.dcmread(files[1])
    context_id = next(
        int(cx.context_id or 0)
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == CTImageStorage
    )
    command = c_store_request_command(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), message_id=2, priority=0
    )
    command_pdu = pdata_pdus(context_id, command, None, 0)
    half = struct.pack(">LBB", 4098, context_id, 0x00) + b"\0" * 4096
    data_pdu = bytes([4, 0]) + struct.pack(">L", len(half)) + half
    abort = bytes([7, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    raw: Any = assoc.dul.socket.socket  # type: ignore[union-attr]
    raw.sendall(command_pdu + data_pdu)
    time.sleep(0.2)
    raw.sendall(abort)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assoc.abort()
    # The node still serves, holds the first instance only and no partial file.
    again = _ae().associate(
        "127.0.0.1", server.dimse_port, contexts=_store_contexts(), ae_title=server.ae_title
    )
    assert again.is_established
    try:
        assert again.send_c_echo().Status == 0x0000
    finally:
        again.release()
    assert stats(server)[3] == 1
    assert blob_count(server) == 1


def _wait_for_the_reader(node: Any, timeout: float = 10.0) -> None:
    """Wait until the node's one association has lent its socket to its reader."""
    from pynetdicom.association import Association

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acceptors = [
            t
            for t in threading.enumerate()
            if isinstance(t, Association) and t.is_acceptor and t.ae is node.ae
        ]
        lease: Any = getattr(acceptors[0].dul, "_pb_lease", None) if acceptors else None
        if lease is not None and lease.holder is acceptors[0]:
            return
        time.sleep(0.005)
    raise AssertionError("the association thread did not take the socket")


@dataclass
class _Node:
    """A DimseServer in the test process, and the instances its socket reader stored."""

    node: Any
    archive: Any
    host: str
    port: int
    ae_title: str
    read: list[str]


@pytest.fixture
def in_process_node(
    tmp_path: Path, pynetdicom_patched, monkeypatch: pytest.MonkeyPatch
) -> Iterator[_Node]:
    from archive import Archive
    from config import Settings
    from dicom_node import DimseServer, store_receive
    from dicom_node.reactor import SocketLease

    # The reader gives the socket back after HOLD_IDLE seconds of silence, and does without
    # it when the DUL has not granted it within GRANT_TIMEOUT: on a loaded machine the test's
    # SCU may be slower than the one, the DUL thread than the other; neither is the path tested.
    monkeypatch.setattr(store_receive, "HOLD_IDLE", 3600.0)
    monkeypatch.setattr(SocketLease, "GRANT_TIMEOUT", 10.0)

    settings = Settings(data_dir=tmp_path / "data", dimse_host="127.0.0.1", dimse_port=0)
    archive = Archive(settings)
    node = DimseServer(archive, settings)
    read: list[str] = []
    store_received = node.store_received

    def counting(assoc: Any, context: Any, request: StoreRequest, data: bytes) -> Any:
        read.append(request.sop_instance_uid)
        return store_received(assoc, context, request, data)

    node.store_received = counting  # type: ignore[method-assign,assignment]
    host, port = node.start()
    try:
        yield _Node(node, archive, host, port, settings.ae_title, read)
    finally:
        node.stop()
        archive.close()


def test_requests_after_the_first_are_read_off_the_socket(in_process_node: _Node, tmp_path: Path):
    """The first C-STORE of an association goes through pynetdicom, the following ones
    through the socket reader, until a message of another kind comes."""
    node = in_process_node
    files = write_series(tmp_path / "ct", 5, size=32)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    assoc = _ae().associate(
        node.host, node.port, contexts=_store_contexts(), ae_title=node.ae_title
    )
    assert assoc.is_established
    try:
        # The association thread asks for the socket once its C-STORE is answered: a request
        # the peer sends before the DUL has lent it is read by pynetdicom (which stores it just
        # as well; see the next test). Each request here waits for the lease, so that the path
        # each one takes is known.
        for path in files[:3]:
            assert assoc.send_c_store(path).Status == 0x0000
            _wait_for_the_reader(node.node)
        assert assoc.send_c_echo().Status == 0x0000
        for path in files[3:]:
            assert assoc.send_c_store(path).Status == 0x0000
            _wait_for_the_reader(node.node)
    finally:
        assoc.release()
    assert node.read == uids[1:3] + uids[4:]
    assert node.archive.stats().instances == 5


def test_requests_read_before_the_socket_is_lent_are_answered(
    in_process_node: _Node, tmp_path: Path
):
    """A peer that sends its next requests before the first is answered: the DUL reads them
    before it can lend the socket, and the reader hands the socket straight back so that
    pynetdicom answers them. (Held for HOLD_IDLE instead, set here to an hour, the peer would
    wait past its DIMSE timeout.)"""
    node = in_process_node
    files = write_series(tmp_path / "ct", 3, size=32)
    assoc = _ae().associate(
        node.host, node.port, contexts=_store_contexts(), ae_title=node.ae_title
    )
    assert assoc.is_established
    context_id = next(
        int(cx.context_id or 0)
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == CTImageStorage
    )
    requests = b""
    for message_id, path in enumerate(files, start=1):
        ds = pydicom.dcmread(path)
        command = c_store_request_command(
            str(ds.SOPClassUID), str(ds.SOPInstanceUID), message_id=message_id, priority=0
        )
        data = encode(ds, False, True)
        assert data is not None
        requests += pdata_pdus(context_id, command, data, assoc.acceptor.maximum_length or 0)
    # As send_c_store does: the association's own reactor leaves the responses alone.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        raw: Any = assoc.dul.socket.socket  # type: ignore[union-attr]
        raw.sendall(requests)
        answered = []
        for _ in files:
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None, "no response within the DIMSE timeout"
            answered.append((response.MessageIDBeingRespondedTo, response.Status))
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
    assert answered == [(1, 0x0000), (2, 0x0000), (3, 0x0000)]
    assert node.archive.stats().instances == 3
